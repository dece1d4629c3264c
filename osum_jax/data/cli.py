"""``osum-data``: build tar shards from a data.list, pre-build indexes, inspect a corpus.

    osum-data make-shards data.list OUT_DIR [--per-shard 1000] [--workers 8] [--prefix shards]
                          [--sample-rate 16000] [--strict]
    osum-data index LIST [--format auto|raw|shard|mix] [--cache-dir DIR]
    osum-data inspect LIST [--format auto|raw|shard|mix] [--limit N] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import os
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import AudioError, decode_audio
from .sources import SampleError, SkipCounter, open_source

log = logging.getLogger("osum_jax.data")

META_FIELDS = ("task", "lang", "speaker", "emotion", "gender")


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)  # bytes, not characters (OSUM's writer truncated non-ASCII metadata)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def _encode_utterance(obj: dict, sample_rate: int) -> list[tuple[str, bytes]]:
    key = str(obj["key"])
    wave, _, _ = decode_audio(obj["wav"], start=obj.get("start"), end=obj.get("end"), target_sr=sample_rate)
    # x * 32768 is the exact inverse of reading int16 PCM as float; clip instead of wrapping around
    pcm = np.clip(np.round(wave.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="WAV", subtype="PCM_16")
    members = [(f"{key}.txt", str(obj["txt"]).encode("utf-8")), (f"{key}.wav", buf.getvalue())]
    for field in META_FIELDS:
        if obj.get(field) is not None:
            members.append((f"{key}.{field}", str(obj[field]).encode("utf-8")))
    extra = obj.get("extra")
    duration = (extra or {}).get("duration") if isinstance(extra, dict) else None
    members.append((f"{key}.duration", str(duration if duration is not None else len(pcm) / sample_rate).encode()))
    if extra:
        members.append((f"{key}.extra", json.dumps(extra, ensure_ascii=False).encode("utf-8")))
    return members


def make_shards(data_list: str | Path, out_dir: str | Path, *, per_shard: int = 1000, prefix: str = "shards",
                sample_rate: int = 16000, workers: int = 8, strict: bool = False, progress: bool = True) -> dict:
    """jsonl -> ``{prefix}_{i:09d}.tar`` (16 kHz int16 wav + metadata members) and ``shards_list.txt``.

    Returns a summary with counts; bad lines/audio are skipped and counted (``strict`` raises).
    """
    src = open_source(data_list, "raw", strict=strict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skips = SkipCounter()
    skips.merge(src.index_skips)
    n_shards = (len(src) + per_shard - 1) // per_shard
    written: list[str] = []
    ok = 0

    def one(i: int):
        rec_obj = json.loads(src._read(int(src._offsets[i]), int(src._lengths[i])).decode("utf-8"))
        if not os.path.isabs(str(rec_obj["wav"])) and not os.path.exists(str(rec_obj["wav"])):
            rec_obj["wav"] = str(src.path.parent / rec_obj["wav"])
        try:
            return _encode_utterance(rec_obj, sample_rate), None
        except AudioError as e:
            return None, SampleError("bad audio", f"{src.path} (key {rec_obj.get('key')})", str(e))
        except OSError as e:
            return None, SampleError("bad audio", f"{src.path} (key {rec_obj.get('key')})", str(e))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(src), desc="make-shards", unit="utt")
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for s in range(n_shards):
            name = out / f"{prefix}_{s:09d}.tar"
            tmp = name.with_name(f".{name.name}.tmp")
            with tarfile.open(tmp, "w") as tf:
                for members, err in ex.map(one, range(s * per_shard, min(len(src), (s + 1) * per_shard))):
                    if err is not None:
                        if strict:
                            raise err
                        skips.add(err)
                        log.warning("skipping %s", err)
                    else:
                        ok += 1
                        for mname, data in members:
                            _add_member(tf, mname, data)
                    if bar:
                        bar.update(1)
            os.replace(tmp, name)
            written.append(str(name.resolve()))
    if bar:
        bar.close()
    list_path = out / "shards_list.txt"
    tmp = list_path.with_name(".shards_list.txt.tmp")
    tmp.write_text("".join(p + "\n" for p in written), encoding="utf-8")
    os.replace(tmp, list_path)
    return {"shards": len(written), "utterances": ok, "skipped": dict(skips.counts), "list": str(list_path)}


def inspect_corpus(path: str, fmt: str = "auto", *, limit: int = 0, cache_dir: str = "") -> dict:
    """Hours, utterances, task mix, a length histogram and skip counts (decodes audio headers only)."""
    src = open_source(path, fmt, cache_dir=cache_dir, progress=True)
    n = len(src) if not limit else min(limit, len(src))
    tasks = collections.Counter()
    seconds = []
    skips = SkipCounter()
    skips.merge(src.index_skips)
    for i in range(n):
        try:
            rec = src[i]
            a = rec["audio"]
            info = sf.info(io.BytesIO(a) if isinstance(a, bytes) else a)
            dur = info.duration
            if rec.get("start") is not None or rec.get("end") is not None:
                dur = (rec.get("end") or dur) - (rec.get("start") or 0.0)
            seconds.append(dur)
            tasks[str(rec.get("task") or "<TRANSCRIBE>")] += 1
        except SampleError as e:
            skips.add(e)
        except Exception as e:  # unreadable audio header
            skips.add(SampleError("bad audio", f"record {i}", str(e)))
    secs = np.asarray(seconds)
    edges = [0, 2, 5, 10, 15, 20, 25, 29, 30, float("inf")]
    hist = np.histogram(secs, bins=edges)[0].tolist() if len(secs) else [0] * (len(edges) - 1)
    return {
        "path": str(path), "utterances": int(len(secs)), "hours": float(secs.sum() / 3600) if len(secs) else 0.0,
        "mean_seconds": float(secs.mean()) if len(secs) else 0.0, "tasks": dict(tasks.most_common()),
        "length_histogram_seconds": {f"{edges[i]}-{edges[i + 1]}": hist[i] for i in range(len(hist))},
        "skipped": dict(skips.counts),
    }


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="osum-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-shards", help="jsonl data.list -> tar shards + shards_list.txt")
    p.add_argument("data_list", help="jsonl data.list (key, wav, txt, optional task/start/end/...)")
    p.add_argument("out_dir", help="output folder for the tars and shards_list.txt")
    p.add_argument("--per-shard", type=int, default=1000, help="utterances per tar (default 1000)")
    p.add_argument("--prefix", default="shards", help="tar file name prefix (default shards)")
    p.add_argument("--sample-rate", type=int, default=16000, help="audio is stored as 16-bit PCM at this rate")
    p.add_argument("--workers", type=int, default=8, help="parallel audio decoders (default 8)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p = sub.add_parser("index", help="build (and cache) the random-access index of a list/shards/mix")
    p.add_argument("path", help="data.list, shards list or mix config")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "shard", "mix"], help="auto (from the file), raw (jsonl data.list), shard (tar shards list) or mix (OSUM data config)")
    p.add_argument("--cache-dir", default="", help="where indexes are cached (default: beside the data, else ~/.cache/osum_jax)")
    p = sub.add_parser("inspect", help="hours, utterances, task mix, length histogram, skipped counts")
    p.add_argument("path", help="data.list, shards list or mix config")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "shard", "mix"], help="auto (from the file), raw (jsonl data.list), shard (tar shards list) or mix (OSUM data config)")
    p.add_argument("--limit", type=int, default=0, help="look at the first N utterances only (default: all)")
    p.add_argument("--cache-dir", default="", help="where indexes are cached (default: beside the data, else ~/.cache/osum_jax)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make-shards":
            t0 = time.time()
            res = make_shards(args.data_list, args.out_dir, per_shard=args.per_shard, prefix=args.prefix,
                              sample_rate=args.sample_rate, workers=args.workers, strict=args.strict)
            res["seconds"] = round(time.time() - t0, 1)
        elif args.cmd == "index":
            src = open_source(args.path, args.format, cache_dir=args.cache_dir, progress=True)
            res = {"path": args.path, "utterances": len(src), "skipped": dict(src.index_skips.counts)}
        else:
            res = inspect_corpus(args.path, args.format, limit=args.limit, cache_dir=args.cache_dir)
    except (SampleError, FileNotFoundError, ValueError) as e:
        print(f"osum-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
