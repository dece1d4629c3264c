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


def _overflowing_copy(pkg, hot):
    """A copy of ``pkg`` whose layer 1 up- and gate-projections are scaled so its MLP product passes 65504
    while every weight stays in fp16 range."""
    import shutil

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
    return hot


def test_overflowing_layer_is_named(setup, tmp_path):
    root, pkg = setup
    hot = _overflowing_copy(pkg, tmp_path / "hot")
    out = tmp_path / "report.json"
    assert cli.main(["calibrate-fp16", "--model", str(hot), "--data", str(root / "data.list"),
                     "--max-new-tokens", "2", "--out", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert rep["verdict"] == "overflow" and "layers [1" in rep["advice"]
    assert rep["layers"][1]["mlp_down_input_max"] >= FP16_MAX and rep["layers"][0]["verdict"] == "safe"


def _prefix_logits(model, root):
    """The LLM's logits over a real prefix (prompt + the speech of a0.wav), in float32."""
    import torch

    from osum_torch_infer import load_audio

    inputs = model.processor([load_audio(str(root / "a0.wav"))], task="<TRANSCRIBE>")
    feats = inputs["input_features"].transpose(1, 2)
    lengths = inputs["feature_attention_mask"].sum(1)
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    with torch.no_grad():
        x, mask = model.build_prefix(feats, lengths, [ids])
        return model(inputs_embeds=x, attention_mask=mask).logits.float()


def test_keep_fp32_auto_keeps_the_overflowing_layer_finite(setup, tmp_path, caplog):
    """fp16 overflows in layer 1 (inf/nan logits); --keep-fp32 auto reads the package's calibration report, runs
    layer 1 in fp32 and the logits are finite and close to the fp32 model's."""
    import torch

    from osum_torch_infer.loading import load_model

    root, pkg = setup
    hot = _overflowing_copy(pkg, tmp_path / "hot")
    assert cli.main(["calibrate-fp16", "--model", str(hot), "--data", str(root / "data.list"),
                     "--max-new-tokens", "2"]) == 1  # the report goes next to the package
    ref = _prefix_logits(load_model(hot, device="cpu", dtype="fp32"), root)
    assert torch.isfinite(ref).all() and float(ref.abs().max()) > 0
    plain = _prefix_logits(load_model(hot, device="cpu", dtype="fp16"), root)
    assert not torch.isfinite(plain).all()  # what the report warns about
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="osum_torch_infer"):
        mixed_model = load_model(hot, device="cpu", dtype="fp16", keep_fp32="auto")
    last = CFG.llm.num_layers == 2  # layer 1 is the last one: the final norm takes its float32 output
    assert mixed_model.keep_fp32 == ("llm.model.layers.1",) + (("llm.model.norm",) if last else ())
    assert mixed_model.llm.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
    assert mixed_model.llm.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert not any("without a passing" in r.getMessage() for r in caplog.records)  # the advice is followed
    mixed = _prefix_logits(mixed_model, root)
    assert torch.isfinite(mixed).all()
    err = float((mixed - ref).abs().max() / ref.abs().max())
    assert err < 2e-2, err
    assert mixed.argmax(-1).tolist() == ref.argmax(-1).tolist()
    # the names given by hand (a number, here the same layer) do the same; the last layer takes the final norm
    by_name = load_model(hot, device="cpu", dtype="fp16", keep_fp32="1")
    assert by_name.keep_fp32 == mixed_model.keep_fp32
    assert torch.isfinite(_prefix_logits(by_name, root)).all()
    # and decoding runs end to end from the CLI
    out = tmp_path / "r.jsonl"
    assert cli.main(["--model", str(hot), "--wav", str(root / "a0.wav"), "--device", "cpu", "--dtype", "fp16",
                     "--keep-fp32", "auto", "--max-new-tokens", "3", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["key"] == "a0"


def test_keep_fp32_mistakes_are_one_line_errors(setup, tmp_path, capsys):
    root, pkg = setup
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(pkg, bare)
    (bare / REPORT).unlink(missing_ok=True)
    wav = str(root / "a0.wav")
    base = ["--model", str(bare), "--wav", wav, "--device", "cpu", "--dtype", "fp16", "--no-progress"]
    cases = {"auto": f"no calibration report {bare / REPORT}", "9": "the LLM has layers 0..",
             "encoder": "'encoder' is not an LLM layer number", str(tmp_path / "nope.json"): "cannot read the "
             "calibration report", "llm.model.layers.0.nope": "no module 'llm.model.layers.0.nope'"}
    (tmp_path / "other.json").write_text(json.dumps({"format": "osum-fp16-calibration/1", "layers": [
        {"layer": 0, "verdict": "safe"}]}))
    cases[str(tmp_path / "other.json")] = "the report has 1 layers but the model has"
    for i, (spec, message) in enumerate(cases.items()):
        assert cli.main([*base, "--keep-fp32", spec, "--out", str(tmp_path / f"o{i}.jsonl")]) == 2, spec
        err = capsys.readouterr().err.strip().splitlines()
        err = [e for e in err if "Loading weights" not in e]  # transformers' progress bar
        assert len(err) == 1 and err[0].startswith("osum-infer: error: ") and message in err[0], (spec, err)
