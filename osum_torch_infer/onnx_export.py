"""ONNX export of the audio tower (Whisper encoder + adapter + projection) with dynamic batch and time axes.

The LLM stays in torch/transformers. The graph is traced by torch's dynamo exporter and validated with
onnxruntime against torch on lengths it was not traced with. The file carries exactly the opset asked for (the
exporter's own output is converted down when it wrote a newer one, else the export fails saying so) and the IR
version asked for (default 8, the ONNX 1.12/1.13-era files Ascend's ATC parser reads); both are recorded in
``audio_tower.json``. Ascend: compile with ATC, e.g.::

    atc --framework=5 --model=audio_tower.onnx --output=audio_tower --soc_version=Ascend910B3 \
        --input_format=ND --input_shape="feats:1,-1,80;feats_lengths:1" --dynamic_dims="500;1000;1500;2000;3000"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


ATC_IR_VERSION = 8  # ONNX 1.12/1.13: what CANN's ATC ONNX parser reads


def _pin_versions(path: Path, opset: int, ir_version: int) -> tuple[int, int]:
    """Make the file at ``path`` carry ``opset`` (default domain) and ``ir_version``; returns what it carries."""
    import onnx
    from onnx import version_converter

    m = onnx.load(str(path))
    have = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if have != opset:
        try:
            m = version_converter.convert_version(m, opset)
        except Exception as e:
            raise RuntimeError(f"--opset {opset}: the exporter wrote opset {have} and converting it to {opset} "
                               f"failed ({type(e).__name__}: {e}); export with --opset {have}") from None
    if m.ir_version != ir_version:
        m.ir_version = ir_version
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise RuntimeError(f"the model is not valid at opset {opset} / IR version {ir_version}: {e}") from None
    onnx.save(m, str(path))
    got = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return got, m.ir_version


def export_onnx(model, out_dir: str | Path, *, trace_frames: int = 400, check_frames: Sequence[int] = (137, 1001),
                opset: int = 18, tolerance: float = 1e-4, ir_version: int = ATC_IR_VERSION) -> dict:
    """Export ``model.audio_tower()`` to ``out_dir/audio_tower.onnx`` and validate it with onnxruntime.

    Inputs ``feats [B, T, n_mels]`` float32 and ``feats_lengths [B]`` int64; outputs ``speech_embeds
    [B, ceil(T/8), D_llm]`` and ``speech_lengths [B]``. The export runs in float32 on CPU whatever the model's
    device/dtype. Validation compares valid frames at ``check_frames`` (batches of two utterances with different
    lengths); raises ``RuntimeError`` if the max relative error exceeds ``tolerance``. Returns a summary.
    """
    import onnxruntime as ort

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "audio_tower.onnx"
    tower = model.audio_tower()
    orig = next(tower.parameters())
    tower = tower.to(device="cpu", dtype=torch.float32).eval()
    m = model.config.encoder.num_mel_bins
    max_frames = model.encoder.max_frames
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, trace_frames, m, generator=g)
    lengths = torch.tensor([trace_frames, max(1, trace_frames * 2 // 3)])
    batch = torch.export.Dim("batch", min=1, max=1024)
    frames = torch.export.Dim("frames", min=2, max=max_frames)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                tower, (feats, lengths), dynamo=True, opset_version=opset,
                input_names=["feats", "feats_lengths"], output_names=["speech_embeds", "speech_lengths"],
                dynamic_shapes={"feats": {0: batch, 1: frames}, "feats_lengths": {0: batch}})
        program.save(str(path))
        opset_written, ir_written = _pin_versions(path, opset, ir_version)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        checks = []
        for t in check_frames:
            t = int(min(t, max_frames))
            x = torch.randn(2, t, m, generator=g)
            lens = torch.tensor([t, max(1, t // 2 + 1)])
            with torch.no_grad():
                ref, ref_len = tower(x, lens)
            got, got_len = session.run(None, {"feats": x.numpy(), "feats_lengths": lens.numpy()})
            if got_len.tolist() != ref_len.tolist():
                raise RuntimeError(f"ONNX lengths {got_len.tolist()} != torch {ref_len.tolist()} at {t} frames")
            err = 0.0
            for b, n in enumerate(ref_len.tolist()):
                r = ref[b, :n].numpy()
                err = max(err, float(np.abs(got[b, :n] - r).max() / max(np.abs(r).max(), 1e-30)))
            checks.append({"frames": t, "max_rel_err": err})
            if err > tolerance:
                raise RuntimeError(f"ONNX output differs from torch at {t} frames: max rel err {err:.3g} > "
                                   f"{tolerance}")
    finally:
        model.audio_tower().to(device=orig.device, dtype=orig.dtype)
    info = {"onnx": str(path), "opset": opset_written, "ir_version": ir_written, "trace_frames": trace_frames,
            "checks": checks,
            "inputs": {"feats": ["batch", "frames", m], "feats_lengths": ["batch"]},
            "outputs": {"speech_embeds": ["batch", "ceil(frames/8)", int(model.config.text_config.hidden_size)],
                        "speech_lengths": ["batch"]},
            "max_frames": max_frames}
    (out / "audio_tower.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
