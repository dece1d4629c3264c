"""``osum-infer export-onnx``: the audio tower with dynamic batch/time axes, checked with onnxruntime on lengths
it was not traced with."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from flax import nnx

from osum_jax.convert.torch_package import export_torch_package
from osum_jax.models import OSUM
from osum_torch_infer import cli
from osum_torch_infer.modeling import OSUMForConditionalGeneration
from tests.corpus import train_tokenizer
from tests.helpers import rel_err, tiny_model_config


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    tok = train_tokenizer(["a few words for a tokenizer"] * 3, root / "tok", vocab_size=280)
    cfg = tiny_model_config()
    out = root / "pkg"
    export_torch_package(OSUM(cfg, rngs=nnx.Rngs(2)), cfg, out, tokenizer_dir=tok, dtype="fp32", progress=False)
    return out


def test_export_onnx_dynamic_time_axis(package, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert cli.main(["export-onnx", "--model", str(package), "--out", str(out), "--trace-frames", "300",
                     "--check-frames", "137", "1001"]) == 0
    info = json.loads((out / "audio_tower.json").read_text())
    assert [c["frames"] for c in info["checks"]] == [137, 1001]
    assert all(c["max_rel_err"] <= 1e-4 for c in info["checks"])
    # independently: onnxruntime vs the torch model's own encode_speech, batch 3, lengths never traced
    model = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")
    session = ort.InferenceSession(str(out / "audio_tower.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 523, 80)).astype(np.float32)
    lengths = np.array([523, 260, 9])
    emb, lens = session.run(None, {"feats": feats, "feats_lengths": lengths})
    with torch.no_grad():
        ref, ref_lens = model.encode_speech(torch.from_numpy(feats), torch.from_numpy(lengths))
    assert lens.tolist() == ref_lens.tolist() == [66, 33, 2]  # ceil(L / 8)
    for b, n in enumerate(lens):
        assert rel_err(emb[b, :n], ref[b, :n].numpy()) <= 1e-4
    assert cli.main(["export-onnx", "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("opset", [17, 18])
def test_the_file_carries_the_opset_and_ir_version_asked_for(package, tmp_path, opset):
    import onnx

    out = tmp_path / f"onnx{opset}"
    assert cli.main(["export-onnx", "--model", str(package), "--out", str(out), "--trace-frames", "200",
                     "--check-frames", "137", "--opset", str(opset)]) == 0
    m = onnx.load(str(out / "audio_tower.onnx"))
    written = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    info = json.loads((out / "audio_tower.json").read_text())
    assert written == opset == info["opset"] and m.ir_version == 8 == info["ir_version"]
    assert info["checks"][0]["max_rel_err"] <= 1e-4  # onnxruntime ran the pinned file


def test_audio_only_load_reads_no_llm_tensor(package):
    model = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32", parts="audio")
    llm = [p for p in model.llm.parameters()]
    assert llm and all(p.is_meta for p in llm)
    assert not any(p.is_meta for p in model.audio_tower().parameters())
    full = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")
    x, n = torch.randn(1, 90, 80), torch.tensor([90])
    with torch.no_grad():
        assert torch.equal(model.encode_speech(x, n)[0], full.encode_speech(x, n)[0])
