"""``osum-convert export-torch``: a JAX checkpoint (from ``osum-convert import-*`` or an ``osum-train`` run)
-> the PyTorch package read by ``osum_torch_infer`` (format: docs/package-format.md)."""

from __future__ import annotations

from pathlib import Path


def load_any(ckpt: str | Path, step: int | None = None, overrides=()):
    """``(model, Config)`` from a training run directory or a converter checkpoint, on one CPU device."""
    from ..train.checkpoint import is_run_directory, load_run_model

    if is_run_directory(ckpt):
        model, cfg, _ = load_run_model(ckpt, step, overrides)
        return model, cfg
    from .checkpoint import load_model

    return load_model(ckpt, step, overrides)


def export_torch(ckpt: str | Path, *, out: str | Path, tokenizer: str | Path, prompts: str | Path | None = None,
                 dtype: str = "bf16", merge_lora: bool = True, step: int | None = None, force: bool = False,
                 progress: bool = True, overrides=()) -> dict:
    from .torch_package import export_torch_package

    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"tokenizer directory {tokenizer} does not exist")
    model, cfg = load_any(ckpt, step, overrides)
    prompts = prompts or (cfg.data.prompts or None)
    return export_torch_package(model, cfg.model, out, tokenizer_dir=tokenizer, prompts_path=prompts, dtype=dtype,
                                merge_lora=merge_lora, force=force, eod_token=cfg.data.eod_token, progress=progress,
                                extra_metadata={"source_checkpoint": str(Path(ckpt).absolute())})
