#!/usr/bin/env python
"""Synthesize the demo speech corpus offline with espeak-ng: a few hundred utterances, OSUM task mixes.

    python scripts/make_demo_corpus.py --out demo/corpus [--seed 0] [--train 1600 --dev 48 --test 96]

What makes OSUM's tasks meaningful at toy scale:

* ASR: phrases of 1-3 words from a 20-word vocabulary (the digits and ten commands: "seven", "go left",
  "two stop nine"); no multi-word phrase of dev or test occurs in training, so transcripts must be recognised,
  not remembered. (Single words are the toy equivalent of keyword spotting; they make the task learnable by a
  model trained from scratch in a few minutes on a CPU.)
* SGC (gender): espeak-ng male variants (m1..m4) vs female variants (f1..f4) over en-us and en-gb.
* SAP (age): pitch and speed variants stand in for age: child = high pitch, fast; old = low pitch, slow; adult in
  between (each jittered per utterance).
* Task mix: ``<TRANSCRIBE>``, ``<TRANSCRIBE> <GENDER>``, ``<TRANSCRIBE> <AGE> <GENDER>`` and ``<AGE> <GENDER>``,
  labelled as OSUM does (``open the red door<ADULT><MALE>``, tags only: ``<CHILD><FEMALE>``).

Writes, under ``--out`` (all paths in the lists are relative to it, so the folder can be moved):

    wav/*.wav                 espeak-ng output (22.05 kHz mono; the pipeline resamples to 16 kHz)
    train.list dev.list test.list   raw data.lists (jsonl: key, wav, txt, task, gender, speaker, extra)
    shards/shards_list.txt    the training split as 16 kHz tar shards (osum-data make-shards)
    tokenizer/tokenizer.json  a byte-level BPE trained on the training text and the prompts
    prompts.yaml              short prompts for the four tasks (OSUM's prompt_config.yaml format)
    corpus.json               what was made: counts, hours, label balance, the seed

Deterministic: the same seed gives the same lists, labels and audio.
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
# utterance length in words -> share; single words make the toy ASR task learnable in minutes on a CPU
LENGTHS = {1: 0.4, 2: 0.4, 3: 0.2}

VOICES = {"male": ["en-us+m1", "en-gb-x-rp+m2", "en-us+m3", "en-gb-x-rp+m4"],
          "female": ["en-us+f1", "en-gb-x-rp+f2", "en-us+f3", "en-gb-x-rp+f4"]}
# age -> (espeak pitch 0..99, words per minute); jittered by +-PITCH_JITTER / +-SPEED_JITTER per utterance. The
# pitch steps are small enough that every female voice stays well above every male one (tests/test_demo.py)
AGES = {"child": (62, 190), "adult": (50, 155), "old": (38, 120)}
PITCH_JITTER, SPEED_JITTER = 6, 10
PROMPTS = {"<TRANSCRIBE>": ["Transcribe the speech.", "What is said?"],
           "<TRANSCRIBE> <GENDER>": ["Transcribe, then tag the gender.", "What is said, and by a man or a woman?"],
           "<TRANSCRIBE> <AGE> <GENDER>": ["Transcribe, then tag age and gender.",
                                           "What is said? Then the age and the gender."],
           "<AGE> <GENDER>": ["Only tag age and gender.", "Age and gender only."]}
# task -> share of utterances; the label format of each follows OSUM (tags after the transcript, no spaces)
TASKS = {"<TRANSCRIBE>": 0.55, "<TRANSCRIBE> <GENDER>": 0.15, "<TRANSCRIBE> <AGE> <GENDER>": 0.15,
         "<AGE> <GENDER>": 0.15}


def phrase(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n_words))


def label(text: str, task: str, gender: str, age: str) -> str:
    tags = {"<GENDER>": f"<{gender.upper()}>", "<AGE>": f"<{age.upper()}>"}
    parts = task.split()
    out = text if "<TRANSCRIBE>" in parts else ""
    return out + "".join(tags[p] for p in parts if p in tags)


def plan(seed: int, n_train: int, n_dev: int, n_test: int) -> dict[str, list[dict]]:
    """Every utterance's sentence, voice, age, pitch, speed and task; disjoint sentences across splits."""
    rng = np.random.default_rng(seed)
    # phrases of 2-3 words never repeat across splits (dev/test ones are unseen in training); the 20 single
    # words necessarily occur everywhere, each spoken by other voices at other pitches and speeds
    seen: dict[str, str] = {}
    splits = {}
    tasks, weights = list(TASKS), np.array(list(TASKS.values()))
    lengths, length_w = list(LENGTHS), np.array(list(LENGTHS.values()))
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        chosen = []
        while len(chosen) < n:
            k = lengths[int(rng.choice(len(lengths), p=length_w / length_w.sum()))]
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
            voice = VOICES[gender][int(rng.integers(len(VOICES[gender])))]
            pitch, speed = AGES[age]
            rows.append({"key": f"{name}_{i:04d}", "text": text, "gender": gender, "age": age, "voice": voice,
                         "pitch": int(pitch + rng.integers(-PITCH_JITTER, PITCH_JITTER + 1)),
                         "speed": int(speed + rng.integers(-SPEED_JITTER, SPEED_JITTER + 1)),
                         "task": tasks[int(task_of[i])]})
        splits[name] = rows
    return splits


def synthesize(row: dict, wav: Path) -> None:
    cmd = ["espeak-ng", "-v", row["voice"], "-p", str(row["pitch"]), "-s", str(row["speed"]), "-w", str(wav),
           row["text"]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not wav.is_file() or wav.stat().st_size < 1000:
        raise RuntimeError(f"espeak-ng failed for {row['key']} ({' '.join(cmd)}): {res.stderr.strip()}")


def build(out: Path, seed: int, n_train: int, n_dev: int, n_test: int, workers: int, vocab_size: int) -> dict:
    from osum_jax.data.cli import make_shards
    from osum_jax.data.text import PromptBook, normalize_label, train_bpe_tokenizer

    if shutil.which("espeak-ng") is None:
        raise SystemExit("make_demo_corpus: espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    splits = plan(seed, n_train, n_dev, n_test)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # built aside, renamed when complete
    try:
        (tmp / "wav").mkdir()
        rows = [r for split in splits.values() for r in split]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda r: synthesize(r, tmp / "wav" / f"{r['key']}.wav"), rows))
        summary = {"seed": seed, "splits": {}}
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
                "age": dict(collections.Counter(r["age"] for r in split))}
        # the training split as tar shards (what OSUM trains from); paths in the shard list are relative
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            res = make_shards("train.list", "shards", per_shard=128, workers=workers, progress=False)
        finally:
            os.chdir(cwd)
        # shard paths relative to the list (the shard source resolves them there), so the corpus can move
        shard_list = tmp / "shards" / "shards_list.txt"
        shard_list.write_text("".join(Path(p).name + "\n" for p in shard_list.read_text().split()), encoding="utf-8")
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
    ap.add_argument("--train", type=int, default=1600)
    ap.add_argument("--dev", type=int, default=48)
    ap.add_argument("--test", type=int, default=96)
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--vocab-size", type=int, default=400)
    args = ap.parse_args(argv)
    t0 = time.time()
    summary = build(Path(args.out), args.seed, args.train, args.dev, args.test, args.workers, args.vocab_size)
    for name, s in summary["splits"].items():
        print(f"{name:5s}: {s['utterances']:4d} utterances, {s['minutes']:5.1f} min, tasks {s['tasks']}, "
              f"gender {s['gender']}, age {s['age']}")
    print(f"corpus written to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
