"""``osum-infer calibrate-fp16``: per-layer activation and attention-score peaks measured on CPU, a verdict a
float16 load respects (a warning without a passing report)."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
from flax import nnx
from safetensors.torch import load_file, save_file

from osum_jax.convert.torch_package import export_torch_package
from osum_jax.models import OSUM
from osum_torch_infer import cli
from osum_torch_infer.calibrate import FP16_MAX, REPORT
from osum_torch_infer.modeling import OSUMForConditionalGeneration
from tests.corpus import train_tokenizer
from tests.helpers import tiny_model_config

CFG = tiny_model_config()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, root / "tok", vocab_size=300)
    pkg = root / "pkg"
    export_torch_package(OSUM(CFG, rngs=nnx.Rngs(0)), CFG, pkg, tokenizer_dir=tok, dtype="fp32", progress=False)
    rng = np.random.default_rng(0)
    lines = []
    for i, sec in enumerate((1.2, 0.7)):
        sf.write(root / f"a{i}.wav", (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
        lines.append(json.dumps({"key": f"a{i}", "wav": str(root / f"a{i}.wav")}))
    (root / "data.list").write_text("\n".join(lines) + "\n")
    return root, pkg


def test_a_normal_package_is_safe_and_fp16_loads_quietly(setup, caplog, capsys):
    root, pkg = setup
    with caplog.at_level(logging.WARNING, logger="osum_torch_infer"):
        OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp16")
    assert any("without a passing fp16_calibration.json" in r.getMessage() for r in caplog.records)
    assert cli.main(["calibrate-fp16", "--model", str(pkg), "--data", str(root / "data.list"),
                     "--max-new-tokens", "4"]) == 0
    rep = json.loads((pkg / REPORT).read_text())
    assert rep["verdict"] == "safe" and rep["utterances"] == 2 and len(rep["layers"]) == CFG.llm.num_layers
    assert all(0 < r["attention_score_max"] < FP16_MAX / 2 and r["residual_max"] > 0 for r in rep["layers"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="osum_torch_infer"):
        OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp16")
    assert not any("calibration" in r.getMessage() for r in caplog.records)


def test_overflowing_layer_is_named(setup, tmp_path):
    """Scale one layer's up-projection so its MLP product passes 65504 while the weights stay in fp16 range."""
    import shutil

    root, pkg = setup
    hot = tmp_path / "hot"
    shutil.copytree(pkg, hot)
    (hot / REPORT).unlink(missing_ok=True)
    f = next(hot.glob("model*.safetensors"))
    state = load_file(str(f))
    key = "llm.model.layers.1.mlp.up_proj.weight"
    assert key in state
    state[key] = state[key] * 3e3
    gate = "llm.model.layers.1.mlp.gate_proj.weight"
    state[gate] = state[gate] * 3e3
    assert float(state[key].abs().max()) < FP16_MAX  # a weight check would pass
    save_file(state, str(f), metadata={"format": "pt"})
    out = tmp_path / "report.json"
    assert cli.main(["calibrate-fp16", "--model", str(hot), "--data", str(root / "data.list"),
                     "--max-new-tokens", "2", "--out", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert rep["verdict"] == "overflow" and "layers [1" in rep["advice"]
    assert rep["layers"][1]["mlp_down_input_max"] >= FP16_MAX and rep["layers"][0]["verdict"] == "safe"
