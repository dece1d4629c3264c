"""A bad line costs that line, counted under its reason; ordinary mistakes get one line and exit code 2.

Audio is generated here (tones + noise through soundfile), so these tests need no external tool.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from osum_jax.config import DataConfig
from osum_jax.data import DataPipeline, skip_counts
from osum_jax.data.records import SampleError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def _tone(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.corpus import train_tokenizer

    root = tmp_path_factory.mktemp("robust")
    tok = train_tokenizer([" ".join(WORDS)] * 4 + WORDS, root / "tok", vocab_size=120)
    good = []
    for i in range(3):
        sf.write(root / f"good{i}.wav", _tone(1.0 + 0.2 * i, seed=i), 16000, subtype="PCM_16")
        good.append({"key": f"good{i}", "wav": f"good{i}.wav", "txt": " ".join(WORDS[i:i + 2])})
    # truncated: the header promises 4 s, the file holds ~1.3 s
    sf.write(root / "full.wav", _tone(4.0), 16000, subtype="PCM_16")
    data = (root / "full.wav").read_bytes()
    (root / "trunc.wav").write_bytes(data[: 44 + int(1.3 * 16000) * 2])
    sf.write(root / "blip.wav", _tone(0.05), 16000, subtype="PCM_16")  # 5 frames
    # accepted: stereo 44.1 kHz FLAC, 8 kHz WAV
    stereo = np.stack([_tone(1.1, 44100, 5), _tone(1.1, 44100, 6)], axis=1)
    sf.write(root / "stereo.flac", stereo, 44100)
    sf.write(root / "narrow.wav", _tone(1.3, 8000, 7), 8000, subtype="PCM_16")
    good += [{"key": "good3", "wav": "stereo.flac", "txt": "echo foxtrot"},
             {"key": "good4", "wav": "narrow.wav", "txt": "delta echo"}]
    # unusable audio of every kind
    sf.write(root / "zero.wav", np.zeros(0, np.float32), 16000, subtype="PCM_16")  # a header and no samples
    (root / "empty.wav").write_bytes(b"")
    (root / "text.wav").write_text("this is not audio\n")
    nan = _tone(1.0)
    nan[100:200] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "long.wav", _tone(5.0), 16000, subtype="PCM_16")  # 500 frames > max_frames 400
    bad = [
        {"key": "trunc", "wav": "trunc.wav", "txt": "alpha bravo"},
        {"key": "empty", "wav": "good0.wav", "txt": "   "},
        {"key": "blip", "wav": "blip.wav", "txt": "alpha"},
        {"key": "unknown", "wav": "good1.wav", "txt": "alpha", "task": "<NO_SUCH_TASK>"},
        {"key": "number", "wav": "good1.wav", "txt": 123},
        {"key": "reversed", "wav": "good2.wav", "txt": "alpha", "start": 1.0, "end": 0.5},
        {"key": "missing", "wav": "nowhere.wav", "txt": "alpha"},
        {"key": "zero", "wav": "zero.wav", "txt": "alpha"},
        {"key": "emptyfile", "wav": "empty.wav", "txt": "alpha"},
        {"key": "text", "wav": "text.wav", "txt": "alpha"},
        {"key": "nan", "wav": "nan.wav", "txt": "alpha"},
        {"key": "long", "wav": "long.wav", "txt": "alpha"},
        {"key": "none", "wav": "good0.wav", "txt": "<None>"},
        {"key": "wordy", "wav": "good0.wav", "txt": " ".join(WORDS * 4)},
    ]
    lines = [json.dumps(good[0]), json.dumps(bad[0]), json.dumps(bad[1]), "", json.dumps(good[1]),
             json.dumps(bad[2]), json.dumps(bad[3]), json.dumps(good[2]), '{"key": "broken", ',
             json.dumps(bad[4]), json.dumps(bad[5]), json.dumps(bad[6])]
    lines += [json.dumps(b) for b in bad[7:]] + [json.dumps(g) for g in good[3:]]
    raw = "\n".join(lines).encode() + b'\n{"key": "latin1", "wav": "good0.wav", "txt": "caf\xe9"}\n'
    (root / "data.list").write_bytes(raw)
    (root / "empty.list").write_text("\n\n")
    (root / "prompts.yaml").write_text('"<TRANSCRIBE>": ["alpha bravo"]\n')
    return {"root": root, "tokenizer": tok, "good": [g["key"] for g in good]}


def _cfg(corpus, **kw) -> DataConfig:
    base = dict(tokenizer=str(corpus["tokenizer"]), prompts=str(corpus["root"] / "prompts.yaml"), frame_buckets=(200, 400), max_frames=400,
                target_buckets=(16,), max_label_tokens=16, max_prompt_tokens=128,
                max_frames_per_batch=1600, max_tokens_per_batch=1600, seed=1, num_epochs=1,
                spec_aug=False, spec_sub=False)
    base.update(kw)
    cfg = DataConfig(**base)
    cfg.validate()
    return cfg


def test_each_bad_line_costs_only_itself_under_its_reason(corpus):
    pipe = DataPipeline(_cfg(corpus), str(corpus["root"] / "data.list"), shard_index=0, shard_count=1, train=False)
    assert pipe.unknown_tasks == {"<NO_SUCH_TASK>": 1}  # warned at start-up, not a refusal
    it = iter(pipe.dataset())
    keys = [str(k) for b in it for k in b["keys"][: int(b["num_real"])]]
    assert sorted(keys) == corpus["good"]
    assert skip_counts(it.get_state()) == TRAINING_SKIPS
    assert pipe.index_skips == INDEX_SKIPS


# what training skips, per reason (missing file, empty file, text, zero samples, NaN are all "bad audio")
TRAINING_SKIPS = {"truncated audio": 1, "empty label": 1, "too short": 1, "unknown task": 1, "missing field": 1,
                  "bad segment": 1, "bad audio": 5, "too long": 1, "none label": 1, "label length": 1}
INDEX_SKIPS = {"blank line": 1, "bad json line": 1, "non-utf8 text": 1}
CONFIG_DEPENDENT = ("too short", "too long", "unknown task", "label length")  # training's, from the shards too


def test_list_and_its_shards_are_the_same_data(corpus, tmp_path):
    """make-shards applies training's line-level checks: training from the list and from its shards yields the
    same utterances; the config-dependent filters (length, task) apply to both alike."""
    from osum_jax.data.cli import make_shards

    res = make_shards(corpus["root"] / "data.list", tmp_path / "shards", per_shard=2, workers=2, progress=False)
    assert res["skipped"] == {**{k: v for k, v in TRAINING_SKIPS.items() if k not in CONFIG_DEPENDENT},
                              **INDEX_SKIPS}
    pipe = DataPipeline(_cfg(corpus), res["list"], shard_index=0, shard_count=1, train=False)
    it = iter(pipe.dataset())
    keys = [str(k) for b in it for k in b["keys"][: int(b["num_real"])]]
    assert sorted(keys) == corpus["good"]
    assert skip_counts(it.get_state()) == {k: TRAINING_SKIPS[k] for k in CONFIG_DEPENDENT}
    # a non-empty output folder is refused (no stale shards), --force empties it first
    with pytest.raises(ValueError, match="not empty"):
        make_shards(corpus["root"] / "data.list", tmp_path / "shards", progress=False)
    assert make_shards(corpus["root"] / "data.list", tmp_path / "shards", per_shard=100, progress=False,
                       force=True)["shards"] == 1
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shards_000000000.tar", "shards_list.txt"]
    # the list names its tars relative to itself: the folder can be moved (or copied to the training host)
    assert (tmp_path / "shards" / "shards_list.txt").read_text().split() == ["shards_000000000.tar"]
    from osum_jax.data.sources import open_source

    def keys(lst):
        src = open_source(str(lst), "auto")
        return sorted(src[i]["key"] for i in range(len(src)))

    before = keys(tmp_path / "shards" / "shards_list.txt")
    (tmp_path / "shards").rename(tmp_path / "moved")
    assert keys(tmp_path / "moved" / "shards_list.txt") == before and set(corpus["good"]) <= set(before)


def test_make_shards_strict_names_the_first_bad_line_and_leaves_nothing(corpus, tmp_path):
    from osum_jax.data.cli import make_shards

    with pytest.raises(SampleError) as e:
        make_shards(corpus["root"] / "data.list", tmp_path / "s", per_shard=1, strict=True, progress=False)
    assert str(e.value).startswith(f"{corpus['root'] / 'data.list'}:2") and "truncated audio" in str(e.value)
    assert not (tmp_path / "s").exists(), "strict make-shards left its folder behind"


def test_inspect_reports_what_training_would_skip(corpus, tmp_path):
    from osum_jax.data.cli import inspect_corpus, main

    rep = inspect_corpus(str(corpus["root"] / "data.list"), max_frames=400)
    # from headers alone inspect cannot see NaN samples (1 of training's 5 "bad audio") nor label lengths (no
    # tokenizer); it has no prompt file, so tasks without prompts show in the task mix
    unseen = {"unknown task": 1, "label length": 1, "bad audio": 1}
    want = {k: v - unseen.get(k, 0) for k, v in {**TRAINING_SKIPS, **INDEX_SKIPS}.items()}
    assert rep["skipped"] == {k: v for k, v in want.items() if v}
    assert rep["utterances"] == len(corpus["good"]) + sum(unseen.values())
    assert rep["tasks"]["<NO_SUCH_TASK>"] == 1
    assert main(["inspect", str(corpus["root"] / "empty.list")]) == 2


def test_strict_mode_names_the_first_bad_line_in_file_order(corpus, tmp_path):
    """Line 2's problem is in its audio (found when it is processed); line 3 is the first bad line that can be
    told at start-up, ahead of line 7's unknown task and line 9's broken JSON."""
    lst = corpus["root"] / "data.list"
    with pytest.raises(SampleError) as e:
        DataPipeline(_cfg(corpus, strict=True), str(lst), shard_index=0, shard_count=1)
    assert str(e.value).startswith(f"{lst}:3 ") and "empty label" in str(e.value), str(e.value)
    lines = lst.read_bytes().split(b"\n")
    for drop, want in ((3, f"{lst.name}:7 (key unknown): unknown task"), (7, f"{lst.name}:9: bad json line")):
        del lines[drop - 1]
        lines.insert(drop - 1, lines[0])  # a good line in its place keeps the numbering
        (tmp_path / lst.name).write_bytes(b"\n".join(lines))
        for f in ("good0.wav", "good1.wav", "good2.wav", "trunc.wav", "blip.wav"):
            (tmp_path / f).write_bytes((corpus["root"] / f).read_bytes()) if not (tmp_path / f).exists() else None
        with pytest.raises(SampleError) as e:
            DataPipeline(_cfg(corpus, strict=True), str(tmp_path / lst.name), shard_index=0, shard_count=1)
        assert want in str(e.value), str(e.value)


def test_osum_train_plan_flags_need_plan_and_sane_numbers(tmp_path):
    for args, needle in ((["--devices", "4"], "--devices go(es) with --plan"),
                         (["--json"], "--json go(es) with --plan"),
                         (["--plan", "--hlo-out", "x.hlo"], "--hlo-out goes with --plan --target"),
                         (["--plan", "--devices", "-4"], "must be positive"),
                         (["--plan", "--device-memory-gb", "-1"], "must be positive")):
        r = _train(args, tmp_path)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path / "x.hlo").exists()


def _train(args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "osum_jax.train.cli", str(ROOT / "configs/tiny.yaml"), *args],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.e2e
def test_osum_train_mistakes_are_one_line_and_exit_2(corpus, tmp_path):
    root = corpus["root"]
    (tmp_path / "a_file").write_text("x")
    ok = [f"data.train={root / 'data.list'}", f"data.tokenizer={corpus['tokenizer']}"]
    cases = {
        "no such file": ["data.train=missing.list", f"data.tokenizer={corpus['tokenizer']}"],
        "data.train is not set": ["data.train=", f"data.tokenizer={corpus['tokenizer']}"],
        "is empty": [f"data.train={root / 'empty.list'}", f"data.tokenizer={corpus['tokenizer']}"],
        "no tokenizer.json": [f"data.train={root / 'data.list'}", f"data.tokenizer={tmp_path}"],
        "is not a checkpoint": ok + [f"train.init_from={tmp_path}"],
        "is a file": ok + ["train.output_dir=a_file"],
        "empty label": ok + ["data.strict=true"],  # the data list's line 3, refused before anything is created
    }
    # an output_dir holding a run of another model (its newest step's config item, in the one checkpoint layout)
    from osum_jax.config_loading import load_config

    other = load_config(str(ROOT / "configs/tiny.yaml"), ["model.llm.num_layers=3"])
    step = tmp_path / "other_run" / "checkpoints" / "5"
    (step / "config").mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    (step / "config" / "metadata").write_text(json.dumps(other.to_dict()))
    cases["holds a run of another model (step 5); resume it with its config or pick a new output_dir. "
          "Differences: model.llm.num_layers: 3 there"] = ok + ["train.output_dir=other_run"]
    for needle, args in cases.items():
        out = tmp_path / "run"
        if not any(a.startswith("train.output_dir=") for a in args):
            args = args + ["train.output_dir=run"]
        r = _train(args, tmp_path)
        assert r.returncode == 2, (needle, r.returncode, r.stderr[-2000:])
        msg = [line for line in r.stderr.splitlines() if line.startswith("osum-train:")]
        assert len(msg) == 1 and needle in msg[0], (needle, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not out.exists(), f"{needle}: created {out}"


def test_make_shards_cli_refuses_a_file_as_out(corpus, tmp_path, capsys):
    from osum_jax.data.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["make-shards", str(corpus["root"] / "data.list"), str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    for flag in ("--per-shard", "--sample-rate", "--workers"):  # one line naming the flag; no folder made
        assert main(["make-shards", str(corpus["root"] / "data.list"), str(tmp_path / "s"), flag, "0"]) == 2
        assert f"{flag} must be a positive integer, got 0" in capsys.readouterr().err
        assert not (tmp_path / "s").exists()


def test_osum_eval_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    from osum_torch_infer.evaluate import main

    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("a\tHELLO WORLD\n")
    hyp.write_text("a\tHELLO WORD\n")
    assert main(["--ref", str(ref), "--hyp", str(hyp), "--out", str(ref)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert ref.read_text() == "a\tHELLO WORLD\n"
    assert main(["--ref", str(ref), "--hyp", str(hyp), "--task", "<FOO>"]) == 2
    assert "--task '<FOO>' has no metric" in capsys.readouterr().err
    assert main(["--ref", str(ref), "--hyp", str(hyp), "--task", "<TRANSCRIBE>", "--out", str(tmp_path / "o")]) == 0
    assert "WER: 50.00 %" in capsys.readouterr().out


def test_osum_infer_refuses_bad_decoding_flags_before_loading(tmp_path, capsys):
    """Values transformers would reject mid-run (a traceback) or take silently: one line, exit 2, no model load
    (the --model here does not exist)."""
    from osum_torch_infer.cli import main

    base = ["--model", str(tmp_path / "no_package"), "--wav", "a.wav", "--out", str(tmp_path / "r.jsonl")]
    for flags, needle in ((["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
                          (["--num-beams", "0"], "--num-beams must be an integer >= 1"),
                          (["--do-sample", "--temperature", "-1"], "--temperature must be > 0, got -1"),
                          (["--do-sample", "--top-p", "2"], "--top-p must be in (0, 1], got 2"),
                          (["--top-k", "-3"], "--top-k must be >= 0"),
                          (["--repetition-penalty", "0"], "--repetition-penalty must be > 0")):
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (flags, err)
    assert not (tmp_path / "r.jsonl").exists()


def test_osum_serve_checks_its_flags_before_loading(tmp_path):
    import argparse
    import socket

    from osum_torch_infer.serve.cli import check_serve_args

    def args(**kw):
        base = dict(port=0, host="127.0.0.1", max_batch=8, max_wait_ms=10.0, max_queue=64, max_mb=25.0,
                    max_seconds=600.0, feedback_log=str(tmp_path / "f.jsonl"), replicas=0)
        return argparse.Namespace(**{**base, **kw})

    assert check_serve_args(args()) == ""
    assert "no such folder" in check_serve_args(args(feedback_log=str(tmp_path / "nope" / "f.jsonl")))
    assert "cannot append" in check_serve_args(args(feedback_log=str(tmp_path)))
    assert "--max-batch 0 is out of range" == check_serve_args(args(max_batch=0))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert "cannot listen on 127.0.0.1:" in check_serve_args(args(port=taken.getsockname()[1]))
    # the CLI: one line, exit 2, before the (absent) package is looked at
    r = subprocess.run([sys.executable, "-m", "osum_torch_infer.serve.cli", str(tmp_path / "no_package"),
                        "--feedback-log", str(tmp_path / "nope" / "f.jsonl")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("osum-serve: error: --feedback-log"), r.stderr


def test_osum_style_remap_and_filter_no_extra_info(corpus, tmp_path):
    """OSUM's processor parity: raw <STYLE> tags become its 8 classes for tasks with <STYLE> (exact tags only);
    data.filter_no_extra_info drops lines without a task, counted."""
    from osum_jax.data.text import remap_style

    assert remap_style("故事开始了<小说>") == "故事开始了<有声书>"
    assert remap_style("<朗读><MALE>") == "<新闻科普><MALE>" and remap_style("<小说家>") == "<小说家>"
    root = corpus["root"]
    rows = [{"key": "s", "wav": str(root / "good0.wav"), "txt": "alpha<小说>", "task": "<TRANSCRIBE> <STYLE>"},
            {"key": "t", "wav": str(root / "good1.wav"), "txt": "alpha<小说>"}]
    lst = tmp_path / "style.list"
    lst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "p.yaml").write_text('"<TRANSCRIBE>": ["alpha"]\n"<TRANSCRIBE> <STYLE>": ["bravo"]\n')
    base = dict(prompts=str(tmp_path / "p.yaml"), max_label_tokens=64, target_buckets=(64,))
    pipe = DataPipeline(_cfg(corpus, **base), str(lst), shard_index=0, shard_count=1, train=False)
    tok = pipe.tokenizer
    labels = {pipe.source[i]["key"]: pipe.processor.process(i, 0)["target"][:-1] for i in range(2)}
    assert tok.decode(list(labels["s"])) == "alpha<有声书>"  # remapped for the <STYLE> task ...
    assert tok.decode(list(labels["t"])) == "alpha<小说>"  # ... and only there
    pipe = DataPipeline(_cfg(corpus, filter_no_extra_info=True, **base), str(lst), shard_index=0, shard_count=1,
                        train=False)
    it = iter(pipe.dataset())
    keys = [str(k) for b in it for k in b["keys"][: int(b["num_real"])]]
    assert keys == ["s"] and skip_counts(it.get_state()) == {"no task": 1}
