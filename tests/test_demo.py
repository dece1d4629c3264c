"""`make demo`: the corpus script is deterministic and well-formed; the demo runs end to end (few steps)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
speech = pytest.mark.usefixtures("espeak_ng")  # tests that make speech (marked `speech` by conftest.py)


def _make(out: Path, seed: int = 3) -> None:
    subprocess.run([sys.executable, "scripts/make_demo_corpus.py", "--out", str(out), "--seed", str(seed),
                    "--train", "24", "--dev", "6", "--test", "12", "--test-voices", "8", "--workers", "2"],
                   cwd=ROOT, check=True,
                   capture_output=True)


def _digest(root: Path) -> dict[str, str]:
    """Every file but the audio (and the shards, which carry it): compared byte for byte."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith((".idx.json", ".wav", ".tar"))}


def _audio(root: Path) -> dict[str, bytes]:
    """Every waveform of the corpus: the wav files, and each shard's members (name -> bytes)."""
    import tarfile

    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "wav").glob("*.wav"))}
    for tar in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            out.update({f"{tar.name}/{m.name}": t.extractfile(m).read() for m in t.getmembers()})
    return out


def _assert_same_audio(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """The same files, and each waveform the same length and the same speech. espeak-ng seeds the noise of its
    breathy voices from the clock (``espeak_srand(time(NULL))`` in its initialisation), and one word of one
    utterance once came out with different breath noise (correlation 0.9992 with the other run's, same length);
    so waveforms must correlate at >= 0.99, while everything else (lists, labels, shard members) is
    byte-identical."""
    import io

    import numpy as np
    import soundfile as sf

    assert sorted(a) == sorted(b)
    for name in a:
        if not name.endswith(".wav"):
            assert a[name] == b[name], name
            continue
        x, sx = sf.read(io.BytesIO(a[name]), dtype="float32")
        y, sy = sf.read(io.BytesIO(b[name]), dtype="float32")
        assert sx == sy and x.shape == y.shape, name
        assert np.array_equal(x, y) or np.corrcoef(x, y)[0, 1] >= 0.99, name


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_split_claims(splits: dict[str, list[dict]], text=lambda r: r["text"], voice=lambda r: r["voice"],
                        every_word_trained: bool = True):
    """What the demo's report claims is held out, checked on the rows of every split."""
    from scripts.make_demo_corpus import HELD_OUT_VOICES, VOICES

    held = set(HELD_OUT_VOICES.values())
    train_text = {text(r) for r in splits["train"]}
    train_words = {w for t in train_text for w in t.split()}
    for name in ("dev", "test", "test_voices"):
        phrases = [text(r) for r in splits[name]]
        assert all(len(p.split()) >= 2 for p in phrases), name  # combinations only, no single words
        assert not set(phrases) & train_text, name  # no held-out combination occurs in training
        if every_word_trained:
            assert {w for p in phrases for w in p.split()} <= train_words  # ... but every word does
        for other in ("dev", "test", "test_voices"):
            if other != name:
                assert not set(phrases) & {text(r) for r in splits[other]}, (name, other)
    assert not held & {voice(r) for n in ("train", "dev", "test") for r in splits[n]}  # never seen in training
    assert {voice(r) for r in splits["test_voices"]} == held
    assert {voice(r) for r in splits["train"]} == {v for vs in VOICES.values() for v in vs} - held
    assert held & set(VOICES["male"]) and held & set(VOICES["female"])  # one per gender


def test_demo_splits_hold_out_combinations_and_voices():
    """The corpus plan at the demo's sizes (no audio needed): held-out word combinations and voices."""
    from scripts.make_demo_corpus import plan

    for seed in (0, 1):
        _check_split_claims(plan(seed, {"train": 2400, "dev": 64, "test": 160, "test_voices": 96}))


@speech
@pytest.mark.e2e
def test_demo_corpus_is_deterministic_and_well_formed(tmp_path):
    from osum_jax.data.sources import open_source
    from osum_jax.data.text import PromptBook, Tokenizer
    from osum_torch_infer.parsing import parse_output

    _make(tmp_path / "a")
    _make(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same seed: same lists, labels, tokenizer
    _assert_same_audio(_audio(tmp_path / "a"), _audio(tmp_path / "b"))  # ... and the same speech
    _make(tmp_path / "c", seed=4)
    assert _rows(tmp_path / "c" / "train.list") != _rows(tmp_path / "a" / "train.list")

    root = tmp_path / "a"
    splits = {name: _rows(root / f"{name}.list") for name in ("train", "dev", "test", "test_voices")}
    assert [len(v) for v in splits.values()] == [24, 6, 12, 8]
    _check_split_claims(splits, text=lambda r: r["extra"]["text"], voice=lambda r: r["speaker"],
                        every_word_trained=False)  # 24 training utterances need not hold all 20 words
    from scripts.make_demo_corpus import AGES, VOICES, WORDS  # the script's own label tables

    for name, rows in splits.items():
        for r in rows:
            assert (root / r["wav"]).is_file()
            parsed = parse_output(r["txt"].lower(), r["task"])
            if "<GENDER>" in r["task"]:
                assert parsed["tags"]["gender"] == r["gender"]
                assert r["speaker"] in VOICES[r["gender"]]
            if "<AGE>" in r["task"]:
                assert parsed["tags"]["age"] == r["extra"]["age"] in AGES
            if "<TRANSCRIBE>" in r["task"]:
                assert parsed["transcript"] and set(parsed["transcript"].split()) <= set(WORDS)
            else:
                assert parsed["transcript"] == ""
        assert {r["gender"] for r in rows} == {"male", "female"}
    # the shards hold the training split (relative paths: the corpus folder can be moved)
    moved = tmp_path / "moved"
    root.rename(moved)
    shards = open_source(str(moved / "shards" / "shards_list.txt"), "auto")
    assert len(shards) == 24
    tok = Tokenizer(moved / "tokenizer")
    assert tok.vocab_size <= 512  # fits configs/demo.yaml's vocabulary
    for tag in ("<MALE>", "<FEMALE>", *(f"<{a.upper()}>" for a in AGES)):  # one token each, kept by decoding
        assert len(tok.encode(tag)) == 1 and tok.decode(tok.encode("two" + tag)) == "two" + tag
    book = PromptBook.load(moved / "prompts.yaml")
    book.check_tasks(r["task"] for rows in splits.values() for r in rows)


@speech
@pytest.mark.e2e
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """scripts/demo.py with a few steps: every stage runs and the report is built from the run's own files."""
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--steps", "3", "--train-size", "300",
                          "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
                          "train.eval_max_new_tokens=4", "train.checkpoint_every=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = (out / "report.md").read_text()
    assert "mesh data 1 x fsdp 2 x tensor 1" in report and "gender accuracy" in report
    assert "held-out voices" in report and "never occurs in training" not in report  # the claims as they hold
    assert "word combinations" in report and "chance (random words of the right length) 95 %" in report
    summary = json.loads((out / "summary.json").read_text())
    assert {k for k in summary if k.startswith("test")} == {
        "test: unseen word combinations, training voices", "test-voices: unseen word combinations, held-out voices"}
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert any("eval/loss" in m for m in metrics)
    assert len(_rows(out / "results.jsonl")) == len(_rows(out / "corpus" / "test.list"))
    assert len(_rows(out / "results_voices.jsonl")) == len(_rows(out / "corpus" / "test_voices.list"))
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "eval" / "report.json").read_text())["tasks"]
    assert "osum-train" in (out / "commands.sh").read_text()


def _median_f0(wav: Path) -> float:
    """Median fundamental frequency (Hz) of the voiced 40 ms frames, by autocorrelation (60-400 Hz)."""
    import numpy as np
    import soundfile as sf

    x, sr = sf.read(str(wav))
    frame, hop, f0s = int(0.04 * sr), int(0.01 * sr), []
    for i in range(0, len(x) - frame, hop):
        s = x[i:i + frame] - x[i:i + frame].mean()
        if np.sqrt((s ** 2).mean()) < 0.02:
            continue
        ac = np.correlate(s, s, "full")[frame - 1:]
        lo, hi = int(sr / 400), int(sr / 60)
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            f0s.append(sr / lag)
    return float(np.median(f0s))


@speech
def test_demo_voices_separate_gender_by_pitch(tmp_path):
    """Every female voice is clearly higher than every male one at every age setting (an unknown espeak-ng
    voice name falls back to the default male voice silently: `en-gb+f2` did, which made half the
    "female" utterances male)."""
    from scripts.make_demo_corpus import AGES, PITCH_JITTER, VOICES, synthesize

    f0 = {}
    for gender, voices in VOICES.items():
        for voice in voices:
            for age, (pitch, speed) in AGES.items():
                for dp in (-PITCH_JITTER, PITCH_JITTER):
                    row = {"key": "x", "voice": voice, "pitch": pitch + dp, "speed": speed, "text": "seven go left"}
                    synthesize(row, tmp_path / "x.wav")
                    f0[gender, voice, age, dp] = _median_f0(tmp_path / "x.wav")
    top_male = max(v for k, v in f0.items() if k[0] == "male")
    low_female = min(v for k, v in f0.items() if k[0] == "female")
    assert low_female > 1.1 * top_male, f0
    # and the voices of one gender are not all the same voice
    assert len({round(f0[g, v, "adult", PITCH_JITTER]) for g, vs in VOICES.items() for v in vs}) >= 5, f0
