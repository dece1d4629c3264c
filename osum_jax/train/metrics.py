"""What the training loop logs: per-step metrics, evaluation scores, and where they are written.

:class:`StepAccumulator` turns one optimizer step's micro-batch outputs into its metrics (token-weighted loss,
throughput, MFU, the non-finite flag); :func:`flat_scores` flattens an evaluation's scoring report;
:class:`MetricsWriter` writes both to ``metrics.jsonl`` and TensorBoard on process 0.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from .mesh import process_sum

if TYPE_CHECKING:
    from .trainer import Trainer


def tensorboard_tag(name: str) -> str:
    """``eval/<TRANSCRIBE><GENDER>/wer`` -> ``eval/TRANSCRIBE-GENDER/wer``: TensorBoard tags allow only letters,
    digits, ``_ - . /`` (tensorboardX otherwise renames them itself and logs a line per tag and evaluation)."""
    name = re.sub(r">\s*<", "-", name)
    return re.sub(r"[^A-Za-z0-9_./-]", "", name)


class MetricsWriter:
    """JSONL (always) + TensorBoard (tensorboardX) on process 0."""

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if self.enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (np.floating, np.integer, float, int)) else v)
                                for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(tensorboard_tag(k), v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class StepAccumulator:
    """Per optimizer step: mean loss over its micro-batches (token-weighted), throughput, non-finite count."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.outs, self.started, self.tokens, self.audio_s, self.flops = [], None, 0, 0.0, 0.0

    def add(self, out, host, started: float, flops=0.0):
        """``started``: ``perf_counter()`` before this micro-batch was fetched; the step's wall time runs from
        its first micro-batch's fetch until its results are on the host (dispatch is asynchronous)."""
        self.outs.append(out)
        self.flops += flops
        self.started = started if self.started is None else self.started
        from ..data.pipeline import real_rows

        real = real_rows(host)
        self.tokens += int(np.sum(host["target_lengths"][real]))
        self.audio_s += float(np.sum(host["feats_lengths"][real])) / 100.0

    def flush(self, trainer: Trainer, lr) -> dict[str, float]:
        outs = jax.device_get(self.outs)  # waits for the step's computation
        step_time = time.perf_counter() - self.started
        self.tokens, self.audio_s = process_sum([self.tokens, self.audio_s])  # every process's rows
        n = np.array([float(o["num_tokens"]) for o in outs])
        losses = np.array([float(o["loss"]) for o in outs])
        # the optimizer skipped this window iff its skip counter moved (a non-finite gradient anywhere in it)
        skipped = int(outs[-1]["skipped_windows"]) > trainer.nonfinite_steps
        metrics = {
            "loss": float(np.sum(losses * n) / max(n.sum(), 1.0)),  # nan when a micro-batch's loss was
            # norm of the window's mean gradient, the one clipping sees (nan for a skipped window)
            "grad_norm": float(outs[-1]["window_grad_norm"]) if not skipped else float("nan"),
            "learning_rate": float(lr),
            "step_time_s": step_time,
            "target_tokens_per_s": self.tokens / step_time if step_time else 0.0,
            "audio_seconds_per_s": self.audio_s / step_time if step_time else 0.0,
            "nonfinite": 1 if skipped else 0,  # the optimizer's own count: nonfinite_steps == its skipped windows
            "model_tflops_per_s": self.flops / step_time / 1e12 if step_time else 0.0,
            "compiled_shapes": len(trainer.shapes_seen),
        }
        peak = trainer.cfg.train.peak_tflops_per_device
        if peak > 0 and step_time:
            metrics["mfu"] = self.flops / step_time / (peak * 1e12 * trainer.mesh.size)
        self.reset()
        return metrics


def flat_scores(report: dict) -> dict[str, float]:
    """``osum_torch_infer.scoring.score`` report -> flat ``eval/<task>/<metric>`` numbers for logging."""
    out = {}
    for task, r in report["tasks"].items():
        name = task.replace(" ", "")
        for m in ("wer", "cer"):
            if m in r:
                out[f"eval/{name}/{m}"] = float(r[m]["rate"])
        for field, t in r.get("tags", {}).items():
            out[f"eval/{name}/{field}_accuracy"] = float(t["accuracy"])
    return out
