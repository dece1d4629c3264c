"""``osum-convert export-torch``: a JAX checkpoint (from ``osum-convert import-*`` or an ``osum-train`` run)
-> the PyTorch package read by ``osum_torch_infer`` (format: docs/package-format.md)."""

from __future__ import annotations

from pathlib import Path


def lazy_checkpoint(ckpt: str | Path, step: int | None = None, overrides=()):
    """``({dotted path: LazyLeaf}, Config)`` of a training run directory or a converter checkpoint: names and
    shapes checked against the stored config, no tensor read yet (an export then streams it tensor by tensor;
    a stacked variable one layer at a time)."""
    from ..checkpoint import check_leaves, lazy_leaves, read_config, resolve

    root, s = resolve(ckpt, step)
    cfg = read_config(root, s, overrides)
    leaves = lazy_leaves(root, s)
    check_leaves(leaves, cfg, f"{root / str(s)}")
    return leaves, cfg


def export_torch(ckpt: str | Path, *, out: str | Path, tokenizer: str | Path, prompts: str | Path | None = None,
                 dtype: str = "bf16", merge_lora: bool = True, step: int | None = None, force: bool = False,
                 progress: bool = True, overrides=()) -> dict:
    from .torch_package import export_torch_package

    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"tokenizer directory {tokenizer} does not exist")
    leaves, cfg = lazy_checkpoint(ckpt, step, overrides)
    prompts = prompts or (cfg.data.prompts or None)
    return export_torch_package(leaves, cfg.model, out, tokenizer_dir=tokenizer, prompts_path=prompts, dtype=dtype,
                                merge_lora=merge_lora, force=force, eod_token=cfg.data.eod_token, progress=progress,
                                extra_metadata={"source_checkpoint": str(Path(ckpt).absolute())})
