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
    import sys
    import tempfile

    import yaml

    from ..checkpoint import find_layout, read_prompts

    leaves, cfg = lazy_checkpoint(ckpt, step, overrides)
    stored = read_prompts(ckpt, step)
    found = find_layout(ckpt, step)
    from_osum = found is not None and found[1].get("source", {}).get("kind") == "osum-pt"
    meta = {"source_checkpoint": str(Path(ckpt).absolute())}
    with tempfile.TemporaryDirectory() as tmp:
        if prompts:
            meta["prompts"] = {"origin": "given", "path": str(Path(prompts).absolute())}
        elif stored:  # the prompt book stored at import (OSUM's own prompts)
            prompts = Path(tmp) / "prompts.yaml"
            prompts.write_text(yaml.safe_dump(stored["prompts"], allow_unicode=True), encoding="utf-8")
            meta["prompts"] = {"origin": "checkpoint", "source": stored.get("source"), "sha256": stored.get("sha256")}
        elif cfg.data.prompts:
            prompts = cfg.data.prompts
            meta["prompts"] = {"origin": "data.prompts", "path": str(Path(prompts).absolute())}
        else:
            meta["prompts"] = {"origin": "project-default"}
        if from_osum and meta["prompts"]["origin"] == "project-default":
            meta["prompts"]["warning"] = OSUM_PROMPTS_WARNING
            print(f"osum-convert export-torch: WARNING: {OSUM_PROMPTS_WARNING}", file=sys.stderr)
        return export_torch_package(leaves, cfg.model, out, tokenizer_dir=tokenizer, prompts_path=prompts,
                                    dtype=dtype, merge_lora=merge_lora, force=force, eod_token=cfg.data.eod_token,
                                    progress=progress, extra_metadata=meta)


OSUM_PROMPTS_WARNING = ("these weights come from OSUM's release, but the package ships this project's English "
                        "prompts, which the released model never saw (OSUM trained on its Chinese "
                        "prompt_config.yaml): pass --prompts PROMPT_YAML here or to import-osum")
