"""``osum-convert average``: the mean of a run's checkpoints (wenet's average_model.py) as a converter checkpoint.

The runs are written by the project's own run checkpointer (``RunCheckpointer``, the one ``osum-train`` saves
with: ``params`` + ``config`` + ``opt`` + ``data`` + ``meta``) from the tiny model's variables with chosen values,
some stored in bfloat16 as ``train.frozen_param_dtype=bfloat16`` stores the frozen LLM."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from osum_jax import checkpoint as ck
from osum_jax.config_loading import load_config
from osum_jax.convert.average import average
from osum_jax.convert.cli import main
from tests.helpers import TINY

STEPS = (10, 20, 30, 40)
BF16 = ("llm.embed_tokens", "llm.layers.mlp.gate_proj.kernel", "llm.layers.mlp.up_proj.kernel")  # frozen, bf16
MOVES_BF16 = "llm.layers.mlp.up_proj.kernel"  # a bfloat16 leaf that differs between steps
FIXED = ("encoder.embed_positions", "llm.embed_tokens", "llm.layers.mlp.gate_proj.kernel")  # equal in every step


def _cfg():
    return load_config(TINY, ["train.output_dir=/tmp/unused"])


def _step_values(cfg, step: int) -> dict[str, np.ndarray]:
    shapes = ck.model_shapes(cfg)
    base = np.random.default_rng(0)
    moved = np.random.default_rng(step)
    out = {}
    for name, shape in sorted(shapes.items()):
        a = base.standard_normal(shape).astype(np.float32)
        if name not in FIXED:
            a = a + np.float32(0.1) * moved.standard_normal(shape).astype(np.float32)
        out[name] = a.astype(ml_dtypes.bfloat16) if name in BF16 else a
    return out


def write_run(out: Path, values: dict[int, dict[str, np.ndarray]]) -> Path:
    """An osum-train run directory with one checkpoint per step of ``values`` ({step: {dotted path: array}})."""
    cfg = _cfg()
    model = ck.abstract_model(cfg)
    variables = ck.flat_variables(model)
    checkpointer = ck.RunCheckpointer(out / "checkpoints", keep=len(values), async_save=False)
    for step, arrays in values.items():
        for name, a in arrays.items():
            variables[name].set_value(jnp.asarray(a))  # the stored dtype is the array's (bf16 where given)
        checkpointer.save(step, nnx.state(model), {"count": np.int32(step)}, {}, {"step": step},
                          cfg.to_dict())
    checkpointer.close()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = _cfg()
    values = {s: _step_values(cfg, s) for s in STEPS}
    return write_run(tmp_path_factory.mktemp("avg") / "run", values), values


def _stored(path, step=None) -> dict[str, np.ndarray]:
    return {k: leaf.get_value() for k, leaf in ck.lazy_leaves(path, step).items()}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_one_step_is_copied_bit_for_bit(run, tmp_path):
    """N = 1: every tensor equal to the step's, bit for bit and dtype for dtype; the output is a converter
    checkpoint (step 0, no optimizer state) with the run's config, and the readers take it."""
    path, _ = run
    out = tmp_path / "avg1"
    info = average(path, steps="20", out=out, progress=False)
    assert info["steps"] == [20] and info["tensors"] == len(ck.model_shapes(_cfg()))
    assert ck.resolve(out) == (out.absolute(), 0) and not ck.is_run_step(out)
    want, got = _stored(path, 20), _stored(out)
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        assert np.array_equal(_bits(got[name]), _bits(a)), name
    assert {str(got[k].dtype) for k in BF16} == {"bfloat16"}
    assert ck.read_config(out).to_dict() == ck.read_config(path, 20).to_dict()
    layout = ck.read_layout(out)
    assert layout["averaged"]["steps"] == [20] and layout["source"] == {"kind": "canonical"}
    assert set(ck.restore_extras(out, 0)) == {"ln_speech.weight", "ln_speech.bias", "speaker_head.weight",
                                             "speaker_head.bias"}
    # export-osum of the average uses what export-osum of the run uses (here OSUM's canonical layout, fresh extras)
    from osum_jax.convert.export_osum import osum_export_source

    mine, theirs = osum_export_source(out), osum_export_source(path, 20)
    assert mine.layout["keys"] == theirs.layout["keys"] and sorted(mine.extras) == sorted(theirs.extras)
    assert all(np.array_equal(mine.extras[k], theirs.extras[k]) for k in mine.extras)
    model, cfg = ck.load_model(out)  # what train.init_from and the exporters read
    v = ck.flat_variables(model)["llm.layers.self_attn.q_proj.lora_b"].get_value()
    np.testing.assert_array_equal(np.asarray(v), want["llm.layers.self_attn.q_proj.lora_b"])


def test_three_steps_are_the_mean(run, tmp_path, monkeypatch):
    """--last 3: each tensor is the float64 mean of the three newest steps, cast back to its stored dtype; a tensor
    equal in all three (frozen) comes out bit-identical. Blocks of 64 KiB, so that the tiny model's larger tensors
    are streamed as the full model's are: one layer of a stacked variable in bands of rows, a matrix in bands."""
    import osum_jax.convert.average as average_module

    monkeypatch.setattr(average_module, "BLOCK_BYTES", 1 << 16)
    shapes = ck.model_shapes(_cfg())
    block, indices = average_module._block_plan(shapes["llm.layers.mlp.up_proj.kernel"], (1 << 16) // 8)
    assert block == (1, 51, 160) and len(indices) == 4 and indices[1] == (0, slice(51, 64))
    block, indices = average_module._block_plan(shapes["llm.embed_tokens"], (1 << 16) // 8)
    assert block == (128, 64) and len(indices) == 4
    path, _ = run
    out = tmp_path / "avg3"
    info = average(path, last=3, out=out, progress=False)
    assert info["steps"] == [20, 30, 40]
    got = _stored(out)
    src = {s: _stored(path, s) for s in (20, 30, 40)}
    for name in got:
        stack = np.stack([src[s][name].astype(np.float64) for s in (20, 30, 40)])
        want = stack.mean(axis=0).astype(src[40][name].dtype)
        assert got[name].dtype == src[40][name].dtype, name
        if name in FIXED:
            assert np.array_equal(_bits(got[name]), _bits(src[40][name])), name
        elif got[name].dtype == np.float32:
            np.testing.assert_array_max_ulp(got[name], want, maxulp=1)
        else:  # bfloat16: the float64 mean rounded once
            np.testing.assert_allclose(got[name].astype(np.float32), want.astype(np.float32), rtol=2 ** -8, atol=0)
    assert got[MOVES_BF16].dtype == ml_dtypes.bfloat16 and not np.array_equal(got[MOVES_BF16], src[40][MOVES_BF16])


def _edit_config(run_dir: Path, step: int, key: str, value) -> None:
    f = run_dir / "checkpoints" / str(step) / "config" / "metadata"
    d = json.loads(f.read_text())
    node = d
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    f.write_text(json.dumps(d))


def test_mixed_configs_are_refused(run, tmp_path, capsys):
    """Steps of different models (here a resumed run whose LoRA alpha changed) are refused with one line naming
    the two steps and the key; a setting that does not change the weights (remat policy) is not a different
    model."""
    path, _ = run
    mixed = tmp_path / "mixed"
    shutil.copytree(path, mixed)
    _edit_config(mixed, 30, "model.lora.alpha", 32.0)
    out = tmp_path / "avg_mixed"
    assert main(["average", str(mixed), "--last", "3", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps 20 and 30" in err[0] and "model.lora.alpha" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".avg_mixed*"))
    _edit_config(mixed, 30, "model.lora.alpha", 16.0)
    _edit_config(mixed, 30, "model.remat_policy", "full")
    assert main(["average", str(mixed), "--last", "3", "--out", str(out), "--no-progress"]) == 0
    assert out.is_dir()


def test_integer_tensors_must_be_equal(tmp_path, capsys):
    """A non-float tensor cannot be averaged: equal in every step it is copied, else refused."""
    cfg = _cfg()
    values = {s: _step_values(cfg, s) for s in (1, 2, 3)}
    for s in (1, 2, 3):
        values[s]["speech_embed"] = np.full(values[s]["speech_embed"].shape, 7, np.int32)
    values[3]["speech_embed"][0, 0] = 8
    path = write_run(tmp_path / "run", values)
    average(path, steps=[1, 2], out=tmp_path / "ok", progress=False)
    assert np.array_equal(_stored(tmp_path / "ok")["speech_embed"], values[1]["speech_embed"])
    assert main(["average", str(path), "--last", "2", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "speech_embed" in err[0] and "steps 2 and 3" in err[0], err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_user_mistakes_are_one_line_and_exit_2(run, tmp_path, capsys):
    path, values = run
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "x").write_text("keep me")
    cases = {
        "no such checkpoint directory": [str(tmp_path / "nope"), "--last", "2"],
        "no step 99 (steps: [10, 20, 30, 40])": [str(path), "--steps", "10,99"],
        "has only 4 step(s)": [str(path), "--last", "5"],
        "expected a positive number": [str(path), "--last", "0"],
        "expected step numbers": [str(path), "--steps", "10,x"],
        "step 10 is given twice": [str(path), "--steps", "10,20,10"],
        "exactly one of --steps A,B,C or --last N": [str(path)],
        "exactly one of": [str(path), "--steps", "10", "--last", "2"],
    }
    for needle, args in cases.items():
        out = tmp_path / "out"
        assert main(["average", *args, "--out", str(out), "--no-progress"]) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("osum-convert average: error: ") and needle in err[0], (needle, err)
        assert not out.exists(), needle
    assert main(["average", str(path), "--last", "2", "--out", str(kept), "--no-progress"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (kept / "x").read_text() == "keep me"
    inside = path / "checkpoints" / "avg"
    assert main(["average", str(path), "--last", "2", "--out", str(inside), "--no-progress"]) == 2
    assert "inside the checkpoints being averaged" in capsys.readouterr().err and not inside.exists()
    # --force replaces it; --steps takes any steps, in any order
    assert main(["average", str(path), "--steps", "40,10", "--out", str(kept), "--force", "--no-progress"]) == 0
    assert not (kept / "x").exists() and ck.read_layout(kept)["averaged"]["steps"] == [10, 40]
    k = "adapter.proj.kernel"
    np.testing.assert_array_max_ulp(_stored(kept)[k], ((values[40][k].astype(np.float64) + values[10][k]) / 2)
                                    .astype(np.float32), maxulp=1)


def test_cli_as_a_user_runs_it(run, tmp_path):
    """The console script, from the run's parent directory with relative paths; a mistake is one line, exit 2."""
    path, _ = run
    exe = str(Path(sys.executable).parent / "osum-convert")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    work = tmp_path / "work"
    shutil.copytree(path, work / "runs" / "osum")

    def convert(*argv):
        return subprocess.run([exe, "average", *argv], cwd=work, capture_output=True, text=True, env=env,
                              timeout=300)

    r = convert("runs/osum", "--last", "2", "--out", "ckpt/osum-avg", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps [30, 40]" in r.stderr and "wrote ckpt/osum-avg" in r.stderr
    assert ck.resolve(work / "ckpt" / "osum-avg")[1] == 0
    r = convert("runs/osum", "--steps", "30,50", "--out", "ckpt/other", "--no-progress")
    assert r.returncode == 2
    msg = [line for line in r.stderr.splitlines() if line.startswith("osum-convert")]
    assert len(msg) == 1 and "no step 50" in msg[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (work / "ckpt" / "other").exists()
