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
from osum_jax.data.sources import SampleError

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
    bad = [
        {"key": "trunc", "wav": "trunc.wav", "txt": "alpha bravo"},
        {"key": "empty", "wav": "good0.wav", "txt": "   "},
        {"key": "blip", "wav": "blip.wav", "txt": "alpha"},
        {"key": "unknown", "wav": "good1.wav", "txt": "alpha", "task": "<NO_SUCH_TASK>"},
    ]
    lines = [json.dumps(good[0]), json.dumps(bad[0]), json.dumps(bad[1]), "", json.dumps(good[1]),
             json.dumps(bad[2]), json.dumps(bad[3]), json.dumps(good[2])]
    (root / "data.list").write_text("\n".join(lines) + "\n")
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
    assert skip_counts(it.get_state()) == {"truncated audio": 1, "empty label": 1, "too short": 1,
                                           "unknown task": 1}


def test_strict_mode_names_the_first_unknown_task_line(corpus):
    with pytest.raises(SampleError) as e:
        DataPipeline(_cfg(corpus, strict=True), str(corpus["root"] / "data.list"), shard_index=0, shard_count=1)
    assert f"{corpus['root'] / 'data.list'}:7" in str(e.value) and "unknown task" in str(e.value)


def _train(args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "osum_jax.train.cli", str(ROOT / "configs/tiny.yaml"), *args],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


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
    }
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
