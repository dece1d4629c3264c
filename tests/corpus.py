"""A small real-speech corpus made offline with espeak-ng, plus a tiny BPE tokenizer trained on its text."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

SENTENCES = [
    ("the quick brown fox jumps over the lazy dog", "en-us", "<TRANSCRIBE> <GENDER>", "<MALE>"),
    ("speech understanding needs good data", "en-us+f3", "<TRANSCRIBE> <GENDER>", "<FEMALE>"),
    ("jax compiles the model once per shape", "en-gb", "<TRANSCRIBE>", ""),
    ("please call stella and ask her to bring these things", "en-gb+f2", "<TRANSCRIBE>", ""),
    ("a small corpus for unit tests", "en-us", None, ""),
    ("the weather is nice today", "en-us+f4", "<TRANSCRIBE> <AGE> <GENDER>", "<ADULT><FEMALE>"),
    ("one two three four five six seven", "en-gb", "<TRANSCRIBE>", ""),
    ("open source models help research", "en-us", "<TRANSCRIBE> <GENDER>", "<MALE>"),
]


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str, path: Path, speed: int = 160) -> None:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True)


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 400) -> Path:
    from osum_jax.data.text import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, out_dir, vocab_size)


def build_corpus(root: Path) -> dict:
    """wav files (22.05 kHz from espeak), one stereo 44.1 kHz flac, one segment (start/end), a data.list."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (text, voice, task, tag) in enumerate(SENTENCES):
        wav = root / f"utt{i}.wav"
        synthesize(text, voice, wav)
        entry = {"key": f"utt{i}", "wav": str(wav), "txt": f"{text.upper()} {tag}".strip()}
        if task:
            entry["task"] = task
        lines.append(entry)
    # stereo flac at another rate
    x, sr = sf.read(root / "utt0.wav", dtype="float32")
    stereo = np.stack([x, 0.5 * x], axis=1)
    sf.write(root / "stereo.flac", stereo, sr, format="FLAC")
    lines.append({"key": "stereo", "wav": str(root / "stereo.flac"), "txt": SENTENCES[0][0], "task": "<TRANSCRIBE>"})
    # a segment of a longer file
    dur = len(x) / sr
    lines.append({"key": "segment", "wav": str(root / "utt0.wav"), "txt": "the quick brown fox", "start": 0.1,
                  "end": round(dur / 2, 2)})
    data_list = root / "data.list"
    data_list.write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    from osum_jax.data.text import PromptBook
    texts = [e["txt"].lower() for e in lines] + [p for ps in PromptBook.load().prompts.values() for p in ps]
    tok_dir = train_tokenizer(texts, root / "tokenizer")
    return {"root": root, "list": data_list, "tokenizer": tok_dir, "entries": lines}


# -- long recordings with known pauses (VAD segmentation tests) ---------------------------------------------------

PAUSE_SENTENCES = ["the weather is nice today", "please call stella", "one two three four five six",
                   "open source models help research", "she sells sea shells", "a quick brown fox jumps"]
PAUSE_SR = 16000


def say(text: str, voice: str = "en-us") -> np.ndarray:
    """espeak-ng speech at 16 kHz, float32, its own leading and trailing silence trimmed (so the pauses a test
    inserts are the only ones)."""
    import io

    import soxr

    r = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True)
    x, sr = sf.read(io.BytesIO(r.stdout), dtype="float32")
    x = soxr.resample(x, sr, PAUSE_SR).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 1e-3)
    return x[loud[0]:loud[-1] + 1]


def speech_with_pauses(n: int, seed: int, gap_seconds: tuple[float, float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``n`` utterances of :data:`PAUSE_SENTENCES` (US and British voices in turn) with a silent pause drawn
    uniformly from ``gap_seconds`` after each: the 16 kHz wave and each pause as ``(start, end)`` samples."""
    rng = np.random.default_rng(seed)
    parts, pauses, pos = [], [], 0
    for k in range(n):
        x = say(PAUSE_SENTENCES[k % len(PAUSE_SENTENCES)], "en-us" if k % 2 else "en-gb")
        parts.append(x)
        pos += len(x)
        gap = int(rng.uniform(*gap_seconds) * PAUSE_SR)
        parts.append(np.zeros(gap, np.float32))
        pauses.append((pos, pos + gap))
        pos += gap
    return np.concatenate(parts), pauses
