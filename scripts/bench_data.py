"""Benchmark the data pipeline: audio seconds processed per wall second, in one process (one worker).

Builds a corpus of real speech with espeak-ng (22.05 kHz wavs, so resampling runs), its tar shards (16 kHz),
and measures side by side: raw list (decode + resample + log-mel + tokenise + prompt + SpecAug/SpecSub), the
same without augmentation, and tar shards (no resampling). Per-stage costs come from timing each stage alone.

    python scripts/bench_data.py --utterances 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osum_jax.config import DataConfig  # noqa: E402
from osum_jax.data import DataPipeline, Tokenizer  # noqa: E402
from osum_jax.data.audio import decode_audio, log_mel_spectrogram  # noqa: E402
from osum_jax.data.cli import make_shards  # noqa: E402
from tests.corpus import SENTENCES, synthesize, train_tokenizer  # noqa: E402


def build(root: Path, n: int) -> tuple[Path, Path, Path]:
    import json

    lines = []
    voices = ["en-us", "en-gb", "en-us+f3", "en-gb+f2"]
    for i in range(n):
        text = " ".join(SENTENCES[(i + k) % len(SENTENCES)][0] for k in range(2))
        wav = root / f"u{i}.wav"
        synthesize(text, voices[i % len(voices)], wav, speed=140 + 10 * (i % 4))
        lines.append({"key": f"u{i}", "wav": str(wav), "txt": text, "task": "<TRANSCRIBE>"})
    lst = root / "data.list"
    lst.write_text("".join(json.dumps(e) + "\n" for e in lines))
    tok = train_tokenizer([e["txt"] for e in lines] + ["transcribe the speech into text."], root / "tok")
    make_shards(lst, root / "shards", per_shard=20, workers=2, progress=False)
    return lst, root / "shards" / "shards_list.txt", tok


def run(cfg: DataConfig, path: str, repeats: int) -> tuple[float, float]:
    pipe = DataPipeline(cfg, path, shard_index=0, shard_count=1)
    proc = pipe.processor
    n = len(pipe.source)
    proc(0)  # warm caches
    audio_s, t0 = 0.0, time.perf_counter()
    for g in range(n * repeats):
        ex = proc(g)
        audio_s += ex["seconds"]
    wall = time.perf_counter() - t0
    return audio_s, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        lst, shards, tok = build(root, args.utterances)
        base = DataConfig(tokenizer=str(tok), num_epochs=args.repeats, max_prompt_tokens=128)
        rows = [
            ("raw list, 22.05 kHz, augment", base, str(lst)),
            ("raw list, 22.05 kHz, no augment", DataConfig(**{**base.__dict__, "spec_aug": False,
                                                              "spec_sub": False}), str(lst)),
            ("tar shards, 16 kHz, augment", base, str(shards)),
        ]
        print(f"# {args.utterances} espeak-ng utterances x {args.repeats} passes, one process")
        print(f"{'pipeline':36} {'audio s':>8} {'wall s':>7} {'x real time':>11}")
        for name, cfg, path in rows:
            a, w = run(cfg, path, args.repeats)
            print(f"{name:36} {a:>8.1f} {w:>7.2f} {a / w:>11.0f}", flush=True)
        # stage breakdown on the raw list
        waves = [decode_audio(str(root / f"u{i}.wav")) for i in range(args.utterances)]
        secs = sum(len(w) / 16000 for w, _, _ in waves)
        t0 = time.perf_counter()
        for i in range(args.utterances):
            decode_audio(str(root / f"u{i}.wav"))
        t_dec = time.perf_counter() - t0
        t0 = time.perf_counter()
        for w, _, _ in waves:
            log_mel_spectrogram(w)
        t_mel = time.perf_counter() - t0
        tk = Tokenizer(tok)
        t0 = time.perf_counter()
        for i in range(args.utterances):
            tk.encode(SENTENCES[i % len(SENTENCES)][0])
        t_tok = time.perf_counter() - t0
        print(f"# stages (x real time): decode+resample {secs / t_dec:.0f}, log-mel {secs / t_mel:.0f}, "
              f"tokenise {secs / max(t_tok, 1e-9):.0f}")


if __name__ == "__main__":
    main()
