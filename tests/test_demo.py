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
    """The same files, byte for byte: the corpus uses no breathy espeak-ng voice (whose noise comes from libc's
    rand()) and resamples in integer arithmetic, so nothing in it varies between runs or machines."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name


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
    trained = {voice(r) for r in splits["train"]}
    assert trained <= {v for vs in VOICES.values() for v in vs} - held
    if every_word_trained:  # a training split big enough to hold every word holds every training voice too
        assert trained == {v for vs in VOICES.values() for v in vs} - held
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
    # the listening stage's list: the training utterances, each asking for age and gender only
    from scripts.make_demo_corpus import LISTEN_TASK

    tags = _rows(root / "train_tags.list")
    assert [(r["key"], r["wav"], r["speaker"]) for r in tags] == [(r["key"], r["wav"], r["speaker"])
                                                                 for r in splits["train"]]
    for r in tags:
        assert r["task"] == LISTEN_TASK == "<AGE> <GENDER>"
        assert r["txt"] == f"<{r['extra']['age'].upper()}><{r['gender'].upper()}>"
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
                          "--listen-steps", "2", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
                          "train.eval_max_new_tokens=4", "train.checkpoint_every=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = (out / "report.md").read_text()
    assert "mesh data 1 x fsdp 2 x tensor 1" in report and "gender accuracy" in report
    assert "held-out voices" in report and "never occurs in training" not in report  # the claims as they hold
    assert "word combinations" in report and "chance (random words of the right length) 95 %" in report
    assert "corpus speech: eSpeak NG" in report  # which espeak-ng, the PCM checksum (no reference at 300 utterances)
    assert "## this run against the documented spread" in report
    summary = json.loads((out / "summary.json").read_text())
    assert {k for k in summary if k.startswith("test")} == {
        "test: unseen word combinations, training voices", "test-voices: unseen word combinations, held-out voices"}
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert any("eval/loss" in m for m in metrics)
    listened = [json.loads(x) for x in (out / "listen" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in listened if "loss" in m] == [1, 2] and not any("eval/loss" in m for m in listened)
    assert "- listening stage: 2 steps, all of --listen-steps" in report
    assert "starts from its encoder and adapter (the rest afresh)" in report
    commands = (out / "commands.sh").read_text()  # the task mix starts from its encoder and adapter
    assert "train.steps=2 train.schedule=constant" in commands  # the listening stage: 2 at most, ending on the loss
    assert "train.stop_below_loss=0.03 train.stop_window=20" in commands
    assert f"train.init_from={out / 'listen'} 'train.init_parts=[encoder,adapter]'" in commands  # shell-quoted
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
    from scripts.make_demo_corpus import AGES, GENDER_PITCH, PITCH_JITTER, VOICES, synthesize

    f0 = {}
    for gender, voices in VOICES.items():
        for voice in voices:
            for age, (pitch, speed) in AGES.items():
                for dp in (-PITCH_JITTER, PITCH_JITTER):
                    row = {"key": "x", "voice": voice, "pitch": pitch + GENDER_PITCH[gender] + dp, "speed": speed,
                           "text": "seven go left"}
                    synthesize(row, tmp_path / "x.wav")
                    f0[gender, voice, age, dp] = _median_f0(tmp_path / "x.wav")
    top_male = max(v for k, v in f0.items() if k[0] == "male")
    low_female = min(v for k, v in f0.items() if k[0] == "female")
    assert low_female > 1.1 * top_male, f0
    # and the voices of one gender are not all the same voice
    assert len({round(f0[g, v, "adult", PITCH_JITTER]) for g, vs in VOICES.items() for v in vs}) >= 5, f0


@speech
def test_demo_voices_speak_each_age_at_one_rate(tmp_path):
    """Age is the speaking rate, so every voice must speak an age's rate alike: espeak-ng's own rates differ by
    up to 1.33x between the demo's voices at one ``-s`` setting (as far apart as two ages), which VOICE_RATE
    scales away. Measured on the words as synthesize() places them: the summed lengths of the 20 words."""
    import numpy as np
    import soundfile as sf

    from scripts.make_demo_corpus import AGES, VOICES, WORDS, synthesize

    def speaking_time(voice: str, rate: int) -> float:
        total = 0.0
        for word in WORDS:
            synthesize({"key": "x", "voice": voice, "pitch": 50, "speed": rate, "text": word}, tmp_path / "x.wav")
            x, _ = sf.read(str(tmp_path / "x.wav"), dtype="int16")
            loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 0.02 * np.abs(x.astype(np.int32)).max())
            total += (loud[-1] - loud[0] + 1) / 16000
        return total

    voices = [v for vs in VOICES.values() for v in vs]
    rates = sorted(speed for _, speed in AGES.values())
    times = {(v, r): speaking_time(v, r) for v in voices for r in rates}
    for r in rates:  # every voice within 6 % of the others' median at each age's rate
        med = float(np.median([times[v, r] for v in voices]))
        assert all(abs(times[v, r] / med - 1) < 0.06 for v in voices), {v: times[v, r] / med for v in voices}
    for slow, fast in zip(rates, rates[1:]):  # and the ages stay far apart for every voice
        assert max(times[v, fast] for v in voices) * 1.2 < min(times[v, slow] for v in voices), times


def _espeak_data_dir() -> Path:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return Path(out.split("Data at:")[1].strip())


@speech
def test_demo_voices_have_no_random_breath_noise():
    """No demo voice is one of espeak-ng's breathy variants: their `breath` noise comes from libc's rand(), so the
    speech would depend on the C library (and the call order). Read from the variant files espeak-ng uses."""
    from scripts.make_demo_corpus import VOICES

    variants = _espeak_data_dir() / "voices" / "!v"
    assert (variants / "f2").is_file(), variants  # the breathy one the demo used to have: the check can see it
    assert any(ln.split()[:1] == ["breath"] for ln in (variants / "f2").read_text().splitlines())
    for voice in (v for vs in VOICES.values() for v in vs):
        variant = variants / voice.split("+")[1]
        assert variant.is_file(), f"{voice}: no variant file {variant} (espeak-ng would silently use its default)"
        lines = [ln.split("//")[0].split() for ln in variant.read_text(errors="replace").splitlines()]
        breath = [ln for ln in lines if ln[:1] == ["breath"] and any(float(x) for x in ln[1:])]
        assert not breath, f"{voice} is breathy: {breath}"


@speech
def test_demo_speech_does_not_depend_on_libc_rand(tmp_path):
    """Every demo voice synthesises the same samples when libc's rand() gives another sequence (as another C
    library would): a rand() replacement is preloaded into espeak-ng. A breathy voice does change (the probe
    works)."""
    import shutil

    from scripts.make_demo_corpus import VOICES

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the rand() replacement")
    (tmp_path / "r.c").write_text("static unsigned s = 12345;\n"
                                  "int rand(void) { s = s * 1103515245u + 12345u; return (s >> 1) & 0x7fffffff; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "r.so"), str(tmp_path / "r.c")], check=True)

    def say(voice: str, preload: bool) -> bytes:
        env = {"PATH": "/usr/bin:/bin", **({"LD_PRELOAD": str(tmp_path / "r.so")} if preload else {})}
        return subprocess.run(["espeak-ng", "-v", voice, "-p", "60", "--stdout", "seven go left"], env=env,
                              capture_output=True, check=True).stdout

    assert say("en-gb-x-rp+f2", False) != say("en-gb-x-rp+f2", True)
    for voice in (v for vs in VOICES.values() for v in vs):
        assert say(voice, False) == say(voice, True), voice


def test_demo_resampler_is_exact_and_band_limited():
    """22.05 -> 16 kHz in integer arithmetic: deterministic, unity gain in the speech band (close to soxr's), the
    band above 8 kHz removed (no aliasing), and the length soxr gives."""
    import numpy as np
    import soxr

    from scripts.make_demo_corpus import resample_to_16k

    t = np.arange(22050) / 22050
    mid = slice(1000, 15000)
    for f, gain in ((300, 1.0), (2500, 1.0), (9000, 0.0), (10500, 0.0)):
        x = np.round(12000 * np.sin(2 * np.pi * f * t)).astype(np.int16)
        y = resample_to_16k(x)
        assert y.dtype == np.int16 and len(y) == 16000 == len(soxr.resample(x.astype(np.float32), 22050, 16000))
        rms = np.sqrt(np.mean(y[mid].astype(float) ** 2)) / (12000 / np.sqrt(2))
        assert abs(rms - gain) < 0.01, (f, rms)
        if gain:
            ref = soxr.resample(x.astype(np.float64), 22050, 16000, quality="HQ")
            assert np.abs(y[mid] - ref[mid]).max() < 40, f  # same timing as soxr, not just the same energy
        assert np.array_equal(y, resample_to_16k(x.copy()))
    assert len(resample_to_16k(np.zeros(0, np.int16))) == 0


def test_demo_resampler_equals_the_direct_sum_exactly():
    """The block matrix product (float64) gives exactly the integer sum that defines the resampler: output j is
    round(sum_i h[441 j + d - 320 i] x[i] / 2**15) over the integer prototype filter h, written out here term by
    term in int64, at full scale, at the edges and at lengths that are not whole blocks."""
    import numpy as np

    from scripts.make_demo_corpus import _TAPS, _UP, _resample_taps, resample_to_16k

    h = _resample_taps().T.reshape(-1)  # the integer prototype, index p + 320 k
    d = (_UP * _TAPS) // 2
    rng = np.random.default_rng(0)
    for x in (rng.integers(-32768, 32768, 1000).astype(np.int16), np.full(441, -32768, np.int16),
              (rng.integers(0, 2, 883) * 65535 - 32768).astype(np.int16), np.ones(1, np.int16)):
        n_out = len(x) * 320 // 441
        ref = np.zeros(n_out, np.int64)
        for j in range(n_out):
            idx = j * 441 + d - 320 * np.arange(len(x))
            ok = (idx >= 0) & (idx < len(h))
            ref[j] = (int((h[idx[ok]] * x[ok].astype(np.int64)).sum()) + (1 << 14)) >> 15
        assert np.array_equal(resample_to_16k(x), np.clip(ref, -32768, 32767).astype(np.int16)), len(x)


@speech
def test_demo_corpus_matches_reference_checksums():
    """The speech of corpus seeds 0-4 is the speech the documented figures were made on
    (scripts/demo_corpus_sha256.json: a sha256 of a few utterances' PCM per seed). On another machine, a
    failure here means its espeak-ng speaks differently, so the demo's documented figures need not hold."""
    from scripts.make_demo_corpus import CHECKSUM_FILE, corpus_checksum, espeak_version

    ref = json.loads(CHECKSUM_FILE.read_text())
    got = {str(seed): corpus_checksum(seed) for seed in range(5)}
    wrong = [s for s in got if got[s] != ref["seeds"][s]]
    assert not wrong, (f"demo corpus seeds {wrong}: speech differs from the reference "
                       f"({espeak_version()} here, the reference made with {ref['espeak_ng']})")


@speech
def test_demo_corpus_records_its_checksum(tmp_path):
    """corpus.json says which espeak-ng made it, its PCM checksum (the one corpus_checksum computes without
    making the corpus), and that a non-default size has no reference to compare with."""
    from scripts.make_demo_corpus import corpus_checksum

    _make(tmp_path / "a")
    info = json.loads((tmp_path / "a" / "corpus.json").read_text())
    assert info["espeak_ng"].startswith("eSpeak NG") and info["sample_rate"] == 16000
    assert info["pcm_sha256"] == corpus_checksum(3, {"train": 24, "dev": 6, "test": 12, "test_voices": 8})
    assert info["reference_sha256"] is None and info["matches_reference"] is None


@speech
def test_feature_noise_perturbs_training_features_only(tmp_path):
    """data.feature_noise (bench_demo's perturbation): training features move by noise of that size, seeded per
    record and epoch (the same twice), and dev features not at all."""
    import dataclasses

    import numpy as np

    from osum_jax.config import ConfigError, DataConfig
    from osum_jax.data import DataPipeline

    _make(tmp_path / "c")
    c = tmp_path / "c"
    cfg = DataConfig(train=str(c / "train.list"), dev=str(c / "dev.list"), tokenizer=str(c / "tokenizer"),
                     prompts=str(c / "prompts.yaml"), spec_aug=False, spec_sub=False, max_frames=256,
                     num_workers=0)
    noisy = dataclasses.replace(cfg, feature_noise=1e-6)
    for train in (True, False):
        a = DataPipeline(cfg, train=train).processor.process(2, 0)["feats"]
        b = DataPipeline(noisy, train=train).processor.process(2, 0)["feats"]
        b2 = DataPipeline(noisy, train=train).processor.process(2, 0)["feats"]
        assert a.dtype == b.dtype == np.float32 and np.array_equal(b, b2)
        if train:
            assert 0.5e-6 < float(np.std(b.astype(np.float64) - a)) < 2e-6
        else:
            assert np.array_equal(a, b)
    assert not np.array_equal(DataPipeline(noisy).processor.process(2, 1)["feats"],
                              DataPipeline(noisy).processor.process(2, 0)["feats"])  # another epoch, other noise
    with pytest.raises(ConfigError, match="feature_noise"):
        dataclasses.replace(cfg, feature_noise=-1e-6).validate()


def test_demo_report_says_when_a_run_falls_outside_the_documented_spread():
    """The report's comparison: figures beside the documented min / median / max, and a plain sentence when a
    figure is worse than the documented range (better is not a failure)."""
    from scripts.demo import against_reference

    ref = {"commit": "abc1234", "command": "python scripts/bench_demo.py --seeds 5", "date": "2026-12-07",
           "runs": [{}] * 5, "spread": {"test_wer": [0.01, 0.02, 0.05], "voices_wer": [0.05, 0.1, 0.15],
                                        "test_gender": [0.98, 0.99, 1.0], "total_s": [500, 520, 560]}}
    good = "\n".join(against_reference({"test_wer": 0.03, "voices_wer": 0.02, "test_gender": 1.0, "total_s": 530},
                                       ref))
    assert "abc1234" in good and "| test WER | 3.0 % | 1.0 / 2.0 / 5.0 % | inside |" in good
    assert "outside: better" in good and "falls outside" not in good
    bad = "\n".join(against_reference({"test_wer": 0.325, "voices_wer": 0.1, "test_gender": 0.9, "total_s": 530},
                                      ref))
    assert "**This run falls outside the documented spread**: test WER 32.5 % (documented 1.0-5.0 %)" in bad
    assert "test gender acc. 90.0 %" in bad
    assert "Below the demo's target" not in good  # 3 % / 2 % WER, 100 % gender: every bound of issue 32 met
    assert ("**Below the demo's target** (issue 32): test WER 32.5 % (target <= 10 %); test gender acc. 90.0 % "
            "(target >= 95 %).") in bad
    assert "no documented spread" in "\n".join(against_reference({"test_wer": 0.1}, None))


def test_bench_demo_rejects_bad_arguments():
    """bench_demo's argument errors are one clear line, before any run starts."""
    for args, msg in ((["--seeds", "0"], "--seeds must be >= 1"),
                      (["--seeds", "2", "--perturb-seed", "7"], "--perturb-seed 7 is not one of the seeds run"),
                      (["--perturb", "-1"], "--perturb must be >= 0"),
                      # demo.py's options, checked by its own parser before any run
                      (["--demo-args", "--listen-until -1"], "--listen-until -1.0: expected a loss > 0"),
                      (["--demo-args=--bogus"], "--demo-args '--bogus': unrecognized arguments: --bogus"),
                      (["--demo-args", "--listen-steps x"], "argument --listen-steps: invalid int value: 'x'"),
                      (["--demo-args", "--see 3"], "--demo-args: --seed is set by bench_demo for every run"),
                      (["--demo-args", "--corpus /tmp"], "--demo-args: --corpus is set by bench_demo"),
                      (["--demo-args", "--steps 5 data.x=1"], "'data.x=1' is an osum-train override"),
                      (["--demo-args", "'unclosed"], "No closing quotation")):
        res = subprocess.run([sys.executable, "scripts/bench_demo.py", *args, "--out", "/nonexistent/x"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and msg in res.stderr.strip().splitlines()[-1], res.stderr


def test_bench_demo_passes_demo_args_to_every_run():
    """--demo-args reaches demo.py as a shell splits it, after the bench's own --out and --seed (the refusals are
    in test_bench_demo_rejects_bad_arguments)."""
    import argparse

    from scripts.bench_demo import demo_options
    from scripts.demo import build_parser

    ap = argparse.ArgumentParser()
    opts = demo_options(ap, "--listen-until 0.05 --listen-parts 'encoder,adapter' --listen-lr=5e-4")
    assert opts == ["--listen-until", "0.05", "--listen-parts", "encoder,adapter", "--listen-lr=5e-4"]
    # what run_demo's command line gives demo.py: the bench's --out and --seed, then these options
    args = build_parser().parse_args(["--out", "/tmp/x", "--seed", "3", *opts, "train.steps=5"])
    assert (args.seed, args.listen_until, args.listen_lr, args.overrides) == (3, 0.05, 5e-4, ["train.steps=5"])
    assert demo_options(ap, "") == []


def test_bench_demo_acceptance_and_spread():
    """bench_demo's spread (min / median / max per figure) and its acceptance bounds (issue 32)."""
    from scripts.bench_demo import failures, spread

    runs = [{"test_wer": w, "total_s": t} for w, t in ((0.02, 500), (0.08, 520), (0.04, 700))]
    assert spread(runs, ["test_wer", "total_s", "age"]) == {"test_wer": [0.02, 0.04, 0.08], "total_s": [500, 520, 700]}
    ok = {"test_wer": 0.1, "voices_wer": 0.2, "test_gender": 0.95, "voices_gender": 1.0, "test_age": 0.96,
          "voices_age": 0.99}
    assert failures("seed 0", ok) == []
    got = failures("seed 1", {**ok, "test_wer": 0.101, "voices_age": 0.949})
    assert got == ["seed 1: test WER 10.1 % (needs <= 10 %)", "seed 1: held-out voices age acc. 94.9 % (needs >= 95 %)"]
    assert failures("s", {k: v for k, v in ok.items() if k != "test_age"}) == ["s: test age acc. missing"]


def test_demo_listening_stage_refuses_bad_input(tmp_path):
    """A negative --listen-steps, a listening stage over a corpus without train_tags.list (made before it),
    --listen-parts naming no model part, a --listen-until that is no loss or a --listen-lr that is no rate, is one
    line and exit 2, before anything runs."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "corpus.json").write_text("{}")
    for args, want in ((["--listen-steps", "-1"], "--listen-steps -1"),
                       (["--listen-steps", "5", "--corpus", str(tmp_path / "old")], "no train_tags.list"),
                       (["--listen-steps", "5", "--listen-parts", "encoder,lm"], "--listen-parts encoder,lm"),
                       (["--listen-steps", "5", "--listen-parts", ""], "expected 'all' or names from"),
                       (["--listen-until", "-0.5"], "--listen-until -0.5"),
                       (["--listen-until", "nan"], "--listen-until nan"),
                       (["--listen-lr", "0"], "--listen-lr 0.0"), (["--listen-lr", "nan"], "--listen-lr nan")):
        res = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(tmp_path / "out"), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and want in res.stderr, res.stderr
        assert not (tmp_path / "out" / "run").exists() and not (tmp_path / "out" / "listen").exists()
