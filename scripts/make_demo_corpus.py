#!/usr/bin/env python
"""Synthesize the demo speech corpus offline with espeak-ng: OSUM task mixes at toy scale, with honest splits.

    python scripts/make_demo_corpus.py --out demo/corpus [--seed 0] [--train 4000 --dev 64 --test 160
                                                          --test-voices 96]

What makes OSUM's tasks meaningful at toy scale, and what is held out:

* ASR: phrases of 1-3 words over a 20-word vocabulary (the digits and ten commands: "seven", "go left",
  "two stop nine"), spoken as isolated words: each word is synthesised alone and starts its own 0.8 s slot,
  like a digit string read with pauses (continuous espeak-ng sentences left a 2-layer model trained from
  scratch unable to find the second and third words within the demo's budget: 86 % / 7 % / 2 % per-position
  word accuracy after 2000 steps). Every word occurs in training; **word combinations** are what is held out:
  dev and both
  test splits hold only 2- and 3-word phrases that never occur in training (nor in each other), so transcripts
  must be recognised word by word, not remembered. Single words (the toy equivalent of keyword spotting, which
  makes the task learnable in minutes on a CPU) occur in training only.
* SGC (gender): espeak-ng male variants vs female variants over en-us and en-gb. **One voice per gender is held
  out** (``HELD_OUT_VOICES``): it never occurs in train or dev, only in ``test_voices.list``, which measures
  generalisation to an unseen speaker; ``test.list`` uses the training voices.
* SAP (age): pitch and speed variants stand in for age: child = high pitch, fast; old = low pitch, slow; adult in
  between (each jittered per utterance).
* Task mix: ``<TRANSCRIBE>``, ``<TRANSCRIBE> <GENDER>``, ``<TRANSCRIBE> <AGE> <GENDER>`` and ``<AGE> <GENDER>``,
  labelled as OSUM does (``two stop nine<ADULT><MALE>``, tags only: ``<CHILD><FEMALE>``).

Writes, under ``--out`` (all paths in the lists are relative to it, so the folder can be moved):

    wav/*.wav                 espeak-ng output (22.05 kHz mono; the pipeline resamples to 16 kHz)
    train.list dev.list test.list test_voices.list   raw data.lists (jsonl: key, wav, txt, task, gender, speaker,
                              extra)
    shards/shards_list.txt    the training split as 16 kHz tar shards (osum-data make-shards)
    tokenizer/tokenizer.json  a byte-level BPE trained on the training text and the prompts
    prompts.yaml              short prompts for the four tasks (OSUM's prompt_config.yaml format)
    corpus.json               what was made: counts, hours, label balance, held-out voices, the seed

Deterministic: the same seed gives the same lists, labels and speech (espeak-ng seeds the breath noise of
its breathy voices from the clock, so two runs' waveforms can differ in that noise; tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMMANDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
WORDS = DIGITS + COMMANDS
# utterance length in words -> share (single words occur in training only: dev and test hold combinations)
LENGTHS = {1: 0.15, 2: 0.45, 3: 0.4}

VOICES = {"male": ["en-us+m1", "en-gb-x-rp+m2", "en-us+m3", "en-gb-x-rp+m4"],
          "female": ["en-us+f1", "en-gb-x-rp+f2", "en-us+f3", "en-gb-x-rp+f4"]}
# one voice per gender that train and dev never contain (test_voices.list only)
HELD_OUT_VOICES = {"male": "en-us+m3", "female": "en-gb-x-rp+f4"}
# split -> (voices it may use, whether single words may occur)
SPLITS = {"train": ("seen", True), "dev": ("seen", False), "test": ("seen", False),
          "test_voices": ("held_out", False)}
# age -> (espeak pitch 0..99, words per minute); jittered by +-PITCH_JITTER / +-SPEED_JITTER per utterance. The
# pitch steps are small enough that every female voice stays well above every male one (tests/test_demo.py)
AGES = {"child": (62, 200), "adult": (50, 150), "old": (38, 105)}
PITCH_JITTER, SPEED_JITTER = 6, 8
# every word is synthesised on its own and gets a slot of this length (its longest trimmed form, "seven" at the
# slowest speed, is ~0.71 s), after a short lead-in: 3 words make 2.45 s, inside data.max_frames=256
SLOT_SECONDS, LEAD_SECONDS = 0.8, 0.05
PROMPTS = {"<TRANSCRIBE>": ["Transcribe the speech.", "What is said?"],
           "<TRANSCRIBE> <GENDER>": ["Transcribe, then tag the gender.", "What is said, and by a man or a woman?"],
           "<TRANSCRIBE> <AGE> <GENDER>": ["Transcribe, then tag age and gender.",
                                           "What is said? Then the age and the gender."],
           "<AGE> <GENDER>": ["Only tag age and gender.", "Age and gender only."]}
# task -> share of utterances; the label format of each follows OSUM (tags after the transcript, no spaces)
TASKS = {"<TRANSCRIBE>": 0.45, "<TRANSCRIBE> <GENDER>": 0.15, "<TRANSCRIBE> <AGE> <GENDER>": 0.2,
         "<AGE> <GENDER>": 0.2}


def phrase(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n_words))


def label(text: str, task: str, gender: str, age: str) -> str:
    tags = {"<GENDER>": f"<{gender.upper()}>", "<AGE>": f"<{age.upper()}>"}
    parts = task.split()
    out = text if "<TRANSCRIBE>" in parts else ""
    return out + "".join(tags[p] for p in parts if p in tags)


def voices_for(kind: str, gender: str) -> list[str]:
    held = HELD_OUT_VOICES[gender]
    return [held] if kind == "held_out" else [v for v in VOICES[gender] if v != held]


def plan(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Every utterance's sentence, voice, age, pitch, speed and task, per split (``SPLITS``).

    Multi-word phrases never repeat across splits; single words occur in train only; the held-out voices occur
    in ``test_voices`` only."""
    rng = np.random.default_rng(seed)
    seen: dict[str, str] = {}
    splits = {}
    tasks, weights = list(TASKS), np.array(list(TASKS.values()))
    for name, n in sizes.items():
        kind, singles = SPLITS[name]
        lengths = {k: w for k, w in LENGTHS.items() if singles or k > 1}
        ks, kw = list(lengths), np.array(list(lengths.values()))
        chosen = []
        while len(chosen) < n:
            k = ks[int(rng.choice(len(ks), p=kw / kw.sum()))]
            text = phrase(rng, k)
            if k > 1 and seen.setdefault(text, name) != name:
                continue
            chosen.append(text)
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        # labels are balanced by quota, then shuffled: gender alternates, age and task follow their shares
        quota = np.floor(weights / weights.sum() * n).astype(int)
        quota[0] += n - quota.sum()
        task_of = rng.permutation(np.repeat(np.arange(len(tasks)), quota))
        age_of = rng.permutation(np.arange(n) % len(AGES))
        rows = []
        for i, text in enumerate(chosen):
            gender = ("male", "female")[i % 2]
            age = list(AGES)[int(age_of[i])]
            pool = voices_for(kind, gender)
            voice = pool[int(rng.integers(len(pool)))]
            pitch, speed = AGES[age]
            rows.append({"key": f"{name}_{i:04d}", "text": text, "gender": gender, "age": age, "voice": voice,
                         "pitch": int(pitch + rng.integers(-PITCH_JITTER, PITCH_JITTER + 1)),
                         "speed": int(speed + rng.integers(-SPEED_JITTER, SPEED_JITTER + 1)),
                         "task": tasks[int(task_of[i])]})
        splits[name] = rows
    return splits


def _espeak(row: dict, text: str) -> tuple[np.ndarray, int]:
    cmd = ["espeak-ng", "-v", row["voice"], "-p", str(row["pitch"]), "-s", str(row["speed"]), "--stdout", text]
    res = subprocess.run(cmd, capture_output=True)
    if res.returncode != 0 or len(res.stdout) < 1000:
        raise RuntimeError(f"espeak-ng failed for {row['key']} ({' '.join(cmd)}): "
                           f"{res.stderr.decode(errors='replace').strip()}")
    import io

    x, sr = sf.read(io.BytesIO(res.stdout), dtype="float32")
    return x, sr


def synthesize(row: dict, wav: Path) -> None:
    """The phrase as a sequence of isolated words, each synthesised alone, trimmed of silence and placed at the
    start of its own ``SLOT_SECONDS`` slot (after ``LEAD_SECONDS`` of silence): digit-string style speech."""
    parts, sr = [], None
    for word in row["text"].split():
        x, sr = _espeak(row, word)
        loud = np.flatnonzero(np.abs(x) > 0.02 * float(np.abs(x).max()))
        x = x[loud[0]:loud[-1] + 1][: int(SLOT_SECONDS * sr)]
        slot = np.zeros(int(SLOT_SECONDS * sr), np.float32)
        slot[: len(x)] = x
        parts.append(slot)
    audio = np.concatenate([np.zeros(int(LEAD_SECONDS * sr), np.float32), *parts])
    sf.write(str(wav), audio, sr, subtype="PCM_16")


def build(out: Path, seed: int, sizes: dict[str, int], workers: int, vocab_size: int) -> dict:
    from osum_jax.data.cli import make_shards
    from osum_jax.data.text import PromptBook, normalize_label, train_bpe_tokenizer

    if shutil.which("espeak-ng") is None:
        raise SystemExit("make_demo_corpus: espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    splits = plan(seed, sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # built aside, renamed when complete
    try:
        (tmp / "wav").mkdir()
        rows = [r for split in splits.values() for r in split]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda r: synthesize(r, tmp / "wav" / f"{r['key']}.wav"), rows))
        summary = {"seed": seed, "held_out_voices": HELD_OUT_VOICES, "splits": {}}
        for name, split in splits.items():
            lines = []
            for r in split:
                lines.append({"key": r["key"], "wav": f"wav/{r['key']}.wav",
                              "txt": label(r["text"], r["task"], r["gender"], r["age"]), "task": r["task"],
                              "gender": r["gender"], "speaker": r["voice"],
                              "extra": {"age": r["age"], "pitch": r["pitch"], "speed": r["speed"],
                                        "text": r["text"]}})
            (tmp / f"{name}.list").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
            seconds = sum(sf.info(str(tmp / "wav" / f"{r['key']}.wav")).duration for r in split)
            summary["splits"][name] = {
                "utterances": len(split), "minutes": round(seconds / 60, 2),
                "tasks": dict(collections.Counter(r["task"] for r in split)),
                "gender": dict(collections.Counter(r["gender"] for r in split)),
                "age": dict(collections.Counter(r["age"] for r in split)),
                "voices": sorted({r["voice"] for r in split}),
                "words": dict(collections.Counter(len(r["text"].split()) for r in split))}
        # the training split as tar shards (what OSUM trains from); make-shards lists them relative to the
        # list, so the corpus can move
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            res = make_shards("train.list", "shards", per_shard=128, workers=workers, progress=False)
        finally:
            os.chdir(cwd)
        summary["shards"] = {"files": res["shards"], "utterances": res["utterances"], "skipped": res["skipped"]}
        texts = [normalize_label(json.loads(x)["txt"]) for x in (tmp / "train.list").read_text().splitlines()]
        texts += [p for ps in PromptBook.load().prompts.values() for p in ps]  # the shipped ones too
        texts += [p for ps in PROMPTS.values() for p in ps]
        # the tags are single tokens, so a tag decision is one prediction (Qwen2's own tokenizer splits them)
        tags = [f"<{x.upper()}>" for x in ("male", "female", *AGES)]
        train_bpe_tokenizer(texts, tmp / "tokenizer", vocab_size=vocab_size, added_tokens=tags)
        # short prompts for the four tasks (data.prompts, OSUM's prompt_config.yaml format): a model this small,
        # trained for minutes, learns to listen much sooner when it does not have to read past 50 prompt tokens
        (tmp / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS, allow_unicode=True, sort_keys=False),
                                          encoding="utf-8")
        (tmp / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--dev", type=int, default=64)
    ap.add_argument("--test", type=int, default=160, help="unseen word combinations, training voices")
    ap.add_argument("--test-voices", type=int, default=96,
                    help="unseen word combinations, the held-out voices (one per gender)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--vocab-size", type=int, default=400)
    args = ap.parse_args(argv)
    t0 = time.time()
    sizes = {"train": args.train, "dev": args.dev, "test": args.test, "test_voices": args.test_voices}
    summary = build(Path(args.out), args.seed, sizes, args.workers, args.vocab_size)
    for name, s in summary["splits"].items():
        print(f"{name:5s}: {s['utterances']:4d} utterances, {s['minutes']:5.1f} min, tasks {s['tasks']}, "
              f"gender {s['gender']}, age {s['age']}")
    print(f"corpus written to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
