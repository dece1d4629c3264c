"""``osum-data``: build tar shards from a data.list, pre-build indexes, inspect a corpus.

    osum-data make-shards data.list OUT_DIR [--per-shard 1000] [--workers 8] [--prefix shards]
                          [--sample-rate 16000] [--strict] [--force]
    osum-data index LIST [--format auto|raw|shard|mix] [--cache-dir DIR]
    osum-data inspect LIST [--format auto|raw|shard|mix] [--limit N] [--min-frames N] [--max-frames N]
                      [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from osum_torch_infer.formats.shards import add_member, utterance_members, write_shard, write_shard_list
from osum_torch_infer.progress import progress_bar

from .audio import AudioError, decode_audio, num_frames, wav_truncation
from .records import SampleError, SkipCounter, check_record
from .sources import open_source

log = logging.getLogger("osum_jax.data")

META_FIELDS = ("task", "lang", "speaker", "emotion", "gender")


def _encode_utterance(obj: dict, sample_rate: int) -> list[tuple[str, bytes]]:
    key = str(obj["key"])
    wave, _, _ = decode_audio(obj["wav"], start=obj.get("start"), end=obj.get("end"), target_sr=sample_rate)
    # x * 32768 is the exact inverse of reading int16 PCM as float; clip instead of wrapping around
    pcm = np.clip(np.round(wave.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="WAV", subtype="PCM_16")
    extra = obj.get("extra")
    duration = (extra or {}).get("duration") if isinstance(extra, dict) else None
    return utterance_members(key, {"txt": str(obj["txt"]), "wav": buf.getvalue(),
                                   **{f: None if obj.get(f) is None else str(obj[f]) for f in META_FIELDS},
                                   "duration": str(duration if duration is not None else len(pcm) / sample_rate),
                                   "extra": json.dumps(extra, ensure_ascii=False) if extra else None})


def make_shards(data_list: str | Path, out_dir: str | Path, *, per_shard: int = 1000, prefix: str = "shards",
                sample_rate: int = 16000, workers: int = 8, strict: bool = False, progress: bool = True,
                force: bool = False) -> dict:
    """jsonl -> ``{prefix}_{i:09d}.tar`` (16 kHz int16 wav + metadata members) and ``shards_list.txt``.

    Applies the line-level checks training applies (:func:`~osum_jax.data.records.check_record`, plus unusable
    or truncated audio), so training from the list and from its shards sees the same utterances; the checks that
    depend on the training config (lengths, tasks) stay with training. Bad lines are skipped and counted under
    their reason; ``strict`` raises at the first bad line in file order, leaving nothing behind. ``out_dir`` must
    be empty or absent (``force`` empties it first), so no stale shard from an earlier run is listed.
    """
    for flag, value in (("--per-shard", per_shard), ("--sample-rate", sample_rate), ("--workers", workers)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; make-shards writes a folder of tars")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty; pick an empty folder or pass --force to empty it first")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    src = open_source(data_list, "raw")  # index problems are counted here; strict mode orders them below
    skips = SkipCounter()
    skips.merge(src.index_skips)
    bad_lines = list(src.bad_lines)
    if strict and bad_lines and (not len(src) or bad_lines[0][0] < src.line_of(0)):
        n, reason, detail = bad_lines[0]
        raise SampleError(reason, f"{src.path}:{n}", detail)
    n_shards = (len(src) + per_shard - 1) // per_shard
    written: list[Path] = []
    ok = 0

    def one(i: int):
        try:
            rec = src[i]
            check_record(rec)
            cut = wav_truncation(rec["audio"])
            if cut is not None:
                raise SampleError("truncated audio", rec["where"], f"the WAV header promises {cut[0]:.2f} s, the "
                                                                   f"file holds {cut[1]:.2f} s")
            if not isinstance(rec["audio"], bytes) and not os.path.isfile(rec["audio"]):
                raise SampleError("bad audio", rec["where"], f"no such file: {rec['audio']}")
            obj = dict(rec, wav=rec["audio"])
            return _encode_utterance(obj, sample_rate), None
        except SampleError as e:
            return None, e
        except (AudioError, OSError) as e:
            return None, SampleError("bad audio", src.where_of(i), str(e))

    bar = progress_bar(total=len(src), desc="make-shards", unit="utt") if progress else None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(workers) as ex:
            for s in range(n_shards):
                name = out / f"{prefix}_{s:09d}.tar"
                with write_shard(name) as tf:
                    for i, (members, err) in zip(range(s * per_shard, min(len(src), (s + 1) * per_shard)),
                                                 ex.map(one, range(s * per_shard, min(len(src), (s + 1) * per_shard)))):
                        line = src.line_of(i)
                        while bad_lines and bad_lines[0][0] < line:  # index problems earlier in the file
                            n, reason, detail = bad_lines.pop(0)
                            if strict:
                                raise SampleError(reason, f"{src.path}:{n}", detail)
                        if err is not None:
                            if strict:
                                raise err
                            skips.add(err)
                            log.warning("skipping %s", err)
                        else:
                            ok += 1
                            for mname, data in members:
                                add_member(tf, mname, data)
                        if bar:
                            bar.update(1)
                written.append(name)
        if strict and bad_lines:
            n, reason, detail = bad_lines[0]
            raise SampleError(reason, f"{src.path}:{n}", detail)
    except BaseException:
        if strict:  # nothing half-made stays behind
            for w in written:
                w.unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        if bar:
            bar.close()
    list_path = out / "shards_list.txt"
    write_shard_list(list_path, written)  # names relative to the list's folder: it can be moved as a whole
    return {"shards": len(written), "utterances": ok, "skipped": dict(skips.counts), "list": str(list_path)}


def inspect_corpus(path: str, fmt: str = "auto", *, limit: int = 0, cache_dir: str = "",
                   min_frames: int | None = None, max_frames: int | None = None) -> dict:
    """Hours, utterances, task mix, a length histogram, and per reason what training would skip: the same
    record checks, WAV truncation and the duration filters (``data.min_frames`` / ``max_frames``, defaults as in
    the config), read from audio headers (decoding every file would cost as much as training's first epoch).
    Raises ``ValueError`` for a list with no utterance at all."""
    from ..config import DataConfig

    d = DataConfig()
    lo = d.min_frames if min_frames is None else min_frames
    hi = d.max_frames if max_frames is None else max_frames
    src = open_source(path, fmt, cache_dir=cache_dir, progress=True)
    if len(src) == 0:
        raise ValueError(f"{path}: no utterances (skipped while indexing: {dict(src.index_skips.counts) or 'none'})")
    n = len(src) if not limit else min(limit, len(src))
    tasks = collections.Counter()
    seconds = []
    skips = SkipCounter()
    skips.merge(src.index_skips)
    for i in range(n):
        try:
            rec = src[i]
            check_record(rec)
            a = rec["audio"]
            try:
                info = sf.info(io.BytesIO(a) if isinstance(a, bytes) else a)
            except Exception as e:  # unreadable audio header, missing file
                raise SampleError("bad audio", rec["where"], str(e)) from None
            if info.frames == 0:
                raise SampleError("bad audio", rec["where"], "the file holds no samples")
            cut = wav_truncation(a)
            if cut is not None:
                raise SampleError("truncated audio", rec["where"], f"header {cut[0]:.2f} s, file {cut[1]:.2f} s")
            dur = info.duration
            if rec.get("start") is not None or rec.get("end") is not None:
                dur = min(rec.get("end") or dur, dur) - (rec.get("start") or 0.0)
            frames = num_frames(int(round(dur * info.samplerate)), info.samplerate)
            if frames < lo:
                raise SampleError("too short", rec["where"], f"{frames} frames < data.min_frames={lo}")
            if frames > hi:
                raise SampleError("too long", rec["where"], f"{frames} frames > data.max_frames={hi}")
            seconds.append(dur)
            tasks[str(rec.get("task") or "<TRANSCRIBE>")] += 1
        except SampleError as e:
            skips.add(e)
    secs = np.asarray(seconds)
    edges = [0, 2, 5, 10, 15, 20, 25, 29, 30, float("inf")]
    hist = np.histogram(secs, bins=edges)[0].tolist() if len(secs) else [0] * (len(edges) - 1)
    return {
        "path": str(path), "utterances": int(len(secs)), "hours": float(secs.sum() / 3600) if len(secs) else 0.0,
        "mean_seconds": float(secs.mean()) if len(secs) else 0.0, "tasks": dict(tasks.most_common()),
        "length_histogram_seconds": {f"{edges[i]}-{edges[i + 1]}": hist[i] for i in range(len(hist))},
        "skipped": dict(skips.counts),
        "skipped_examples": {k: v[:2] for k, v in skips.examples.items()},
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
    p.add_argument("--force", action="store_true", help="empty a non-empty OUT_DIR first (else it is refused)")
    p = sub.add_parser("index", help="build (and cache) the random-access index of a list/shards/mix")
    p.add_argument("path", help="data.list, shards list or mix config")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "shard", "mix"], help="auto (from the file), raw (jsonl data.list), shard (tar shards list) or mix (OSUM data config)")
    p.add_argument("--cache-dir", default="", help="where indexes are cached (default: beside the data, else ~/.cache/osum_jax)")
    p = sub.add_parser("inspect", help="hours, utterances, task mix, length histogram, skipped counts")
    p.add_argument("path", help="data.list, shards list or mix config")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "shard", "mix"], help="auto (from the file), raw (jsonl data.list), shard (tar shards list) or mix (OSUM data config)")
    p.add_argument("--limit", type=int, default=0, help="look at the first N utterances only (default: all)")
    p.add_argument("--min-frames", type=int, help="training's data.min_frames (default: the config default)")
    p.add_argument("--max-frames", type=int, help="training's data.max_frames (default: the config default)")
    p.add_argument("--cache-dir", default="", help="where indexes are cached (default: beside the data, else ~/.cache/osum_jax)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make-shards":
            t0 = time.time()
            res = make_shards(args.data_list, args.out_dir, per_shard=args.per_shard, prefix=args.prefix,
                              sample_rate=args.sample_rate, workers=args.workers, strict=args.strict,
                              force=args.force)
            res["seconds"] = round(time.time() - t0, 1)
        elif args.cmd == "index":
            src = open_source(args.path, args.format, cache_dir=args.cache_dir, progress=True)
            res = {"path": args.path, "utterances": len(src), "skipped": dict(src.index_skips.counts)}
        else:
            res = inspect_corpus(args.path, args.format, limit=args.limit, cache_dir=args.cache_dir,
                                 min_frames=args.min_frames, max_frames=args.max_frames)
    except (SampleError, OSError, ValueError) as e:
        print(f"osum-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
