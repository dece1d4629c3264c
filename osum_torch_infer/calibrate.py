"""``osum-infer calibrate-fp16``: is float16 safe for this package on this kind of audio?

float16 tops out at 65504. A weight check at load is not enough: Qwen2's activations (the residual stream, the
MLP's ``act(gate) * up`` product) and its attention scores ``Q·Kᵀ·scale`` can exceed it, and the Ascend 310P
saturates instead of producing inf, so the output is silent garbage. This runs the package on CPU (float32 or
bfloat16) over real audio, prefill and decoding, and records per layer the largest |value| of the residual stream
after the layer, of the MLP's down-projection input and of the attention scores (computed explicitly by a
calibration attention function, then the normal SDPA runs). The verdict per layer: ``safe`` below half the fp16
range, ``marginal`` below the range, ``overflow`` beyond it; the report says what to do.

The report is written next to the package (``fp16_calibration.json``); loading the package in float16 warns
unless such a report says ``safe``, or the layers it advises keeping in float32 are kept so
(``load_model(..., keep_fp32="auto")``, ``--keep-fp32 auto``: :func:`osum_torch_infer.loading.keep_fp32_modules`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .attention import safe_sdpa_mask
from .files import atomic_file

FP16_MAX = 65504.0
REPORT = "fp16_calibration.json"
VERDICTS = ("safe", "marginal", "overflow")
_CALIB = "osum_calib_sdpa"


class _Recorder:
    def __init__(self, n_layers: int):
        self.act = [0.0] * n_layers  # residual stream after the layer
        self.mlp = [0.0] * n_layers  # down_proj input
        self.score = [0.0] * n_layers  # attention scores over allowed keys

    @staticmethod
    def _max(x: torch.Tensor) -> float:
        return float(x.detach().abs().float().max()) if x.numel() else 0.0


def _calib_attention(recorder: _Recorder):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1) if key.shape[1] != query.shape[1] else key
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        scores = (query.float() @ k.float().transpose(-1, -2)) * scale
        if isinstance(attention_mask, torch.Tensor):
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30
            scores = scores.masked_fill(~allowed, 0.0)
        i = module.layer_idx
        recorder.score[i] = max(recorder.score[i], _Recorder._max(scores))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    return attention


def calibrate(model, items, *, max_new_tokens: int = 32, batch_size: int = 4, task: str | None = None) -> dict:
    """Run ``model`` (a loaded :class:`~osum_torch_infer.modeling.OSUMForConditionalGeneration`, CPU, fp32/bf16)
    over ``items`` (:class:`~osum_torch_infer.pipeline.Item`) and return the report dict."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from .parsing import normalize_task
    from .pipeline import MAX_SECONDS, _prepare

    layers = model.llm.model.layers
    rec = _Recorder(len(layers))
    AttentionInterface.register(_CALIB, _calib_attention(rec))
    AttentionMaskInterface.register(_CALIB, safe_sdpa_mask)
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: rec.act.__setitem__(i, max(rec.act[i], rec._max(out[0] if isinstance(out, tuple)
                                                                                        else out)))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: rec.mlp.__setitem__(i, max(rec.mlp[i], rec._max(a[0])))))
    before = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = _CALIB
    units, used, failed = [], 0, []
    try:
        for it in items:
            t = normalize_task(task or it.task)
            prepared = _prepare(model, it, t, None, MAX_SECONDS)
            if isinstance(prepared, str):
                failed.append({"key": it.key, "error": prepared})
                continue
            units += prepared
            used += 1
        if not units:
            raise ValueError("no usable audio to calibrate on" + (f" ({failed[0]['error']})" if failed else ""))
        for b0 in range(0, len(units), batch_size):
            batch = units[b0:b0 + batch_size]
            t_max = max(u.feats.shape[0] for u in batch)
            feats = np.zeros((len(batch), t_max, batch[0].feats.shape[1]), np.float32)
            for j, u in enumerate(batch):
                feats[j, :u.feats.shape[0]] = u.feats
            lengths = np.array([u.feats.shape[0] for u in batch], np.int64)
            model.generate(feats, lengths, [u.prompt_ids for u in batch], max_new_tokens=max_new_tokens,
                           engine="fast")
    finally:
        model.config.text_config._attn_implementation = before
        for h in hooks:
            h.remove()
    rows, worst = [], "safe"
    order = {v: i for i, v in enumerate(VERDICTS)}
    for i in range(len(layers)):
        peak = max(rec.act[i], rec.mlp[i], rec.score[i])
        verdict = "overflow" if peak >= FP16_MAX else "marginal" if peak >= FP16_MAX / 2 else "safe"
        worst = max(worst, verdict, key=order.get)
        rows.append({"layer": i, "residual_max": rec.act[i], "mlp_down_input_max": rec.mlp[i],
                     "attention_score_max": rec.score[i], "verdict": verdict})
    bad = [r["layer"] for r in rows if r["verdict"] != "safe"]
    if worst == "safe":
        advice = "float16 is safe for this package on this audio (every value below half the fp16 range)"
    else:
        peak = max(max(r["residual_max"], r["mlp_down_input_max"], r["attention_score_max"]) for r in rows)
        advice = (f"float16 is not safe: layers {bad} reach {peak:.4g} (fp16 max {FP16_MAX:g}); keep those layers "
                  f"in float32 (load with --keep-fp32 auto, which reads this report), or run on bf16 hardware "
                  f"(Ascend 910B, NVIDIA Ampere or newer)")
    return {"format": "osum-fp16-calibration/1", "verdict": worst, "advice": advice, "utterances": used,
            "windows": len(units), "failed": failed, "max_new_tokens": max_new_tokens,
            "calibration_dtype": str(model.dtype).replace("torch.", ""), "fp16_max": FP16_MAX, "layers": rows}


def write_report(report: dict, package: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report`` (atomically) to ``out`` or next to the package."""
    path = Path(out) if out else Path(package) / REPORT
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def read_report(path: str | Path, n_layers: int | None = None) -> dict:
    """A calibration report, checked: its format, and one row per LLM layer (``n_layers`` when given) with a
    verdict. ``ValueError`` naming the file and the key on anything else."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read the calibration report {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(report, dict) or report.get("format") != "osum-fp16-calibration/1":
        got = report.get("format") if isinstance(report, dict) else type(report).__name__
        raise ValueError(f"{path}: 'format' is {got!r}, expected 'osum-fp16-calibration/1' (a report written by "
                         f"osum-infer calibrate-fp16)")
    rows = report.get("layers")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: 'layers' must be a non-empty list")
    for j, row in enumerate(rows):
        if not (isinstance(row, dict) and row.get("layer") == j and row.get("verdict") in VERDICTS):
            raise ValueError(f"{path}: layers[{j}] must be {{'layer': {j}, 'verdict': one of {list(VERDICTS)}, ...}}, "
                             f"got {str(row)[:120]}")
    if n_layers is not None and len(rows) != n_layers:
        raise ValueError(f"{path}: the report has {len(rows)} layers but the model has {n_layers}: it was "
                         f"measured on another package")
    return report


def advised_fp32_layers(report: dict) -> list[int]:
    """The layers a report advises keeping in float32: every one not ``safe`` (``marginal`` or ``overflow``)."""
    return [r["layer"] for r in report["layers"] if r["verdict"] != "safe"]


def passing_report(package: str | Path) -> bool:
    """True when a calibration report next to the package says float16 is safe."""
    f = Path(package) / REPORT
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("verdict") == "safe"
    except (OSError, ValueError):
        return False


def main_calibrate(argv: Sequence[str]) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="osum-infer calibrate-fp16",
                                description="measure whether float16 is safe for a package (runs on CPU)")
    p.add_argument("--model", required=True, help="package directory written by osum-convert export-torch")
    p.add_argument("--data", required=True, help="data list of representative audio (jsonl or 'key path')")
    p.add_argument("--dtype", default="fp32", help="calibration dtype on CPU: fp32 (default) or bf16")
    p.add_argument("--max-new-tokens", type=int, default=32, help="decoding steps measured per utterance")
    p.add_argument("--batch-size", type=int, default=4, help="utterances decoded together")
    p.add_argument("--limit", type=int, default=0, help="use the first N utterances only (default: all)")
    p.add_argument("--out", help=f"report path (default: PKG/{REPORT}, where loading in fp16 looks for it)")
    args = p.parse_args(list(argv))
    from .loading import load_model
    from .modeling import PackageError
    from .pipeline import read_list

    try:
        items = read_list(args.data)
        items = [it for it in items if it.error is None][: args.limit or None]
        model = load_model(args.model, device="cpu", dtype=args.dtype)
        report = calibrate(model, items, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        path = write_report(report, args.model, args.out)
    except (PackageError, ValueError, RuntimeError, OSError) as e:
        print(f"osum-infer calibrate-fp16: error: {e}", file=sys.stderr)
        return 2
    print(f"osum-infer calibrate-fp16: {report['verdict']}: {report['advice']} (report: {path})", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=1))
    return 0 if report["verdict"] == "safe" else 1
