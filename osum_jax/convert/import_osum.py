"""``osum-convert import-osum``: OSUM's flat ``.pt`` (and optionally its own YAML, the Qwen2 config and its
prompts) -> JAX checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import checkpoint as ck
from ..config import ConfigError
from ..config_loading import load_config
from .osum_pt import plan_import
from .sources import TorchPtSource, file_size
from .stream import (
    Progress,
    array_leaf,
    check_aliases,
    streamed_leaf,
    write_checkpoint_atomic,
)


def import_osum(pt: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (), *,
                out: str | Path, force: bool = False, progress: bool = True, osum_config: str | Path | None = None,
                llm_config: str | Path | None = None, prompts: str | Path | None = None) -> dict[str, Any]:
    """OSUM's flat ``.pt`` -> JAX checkpoint. Returns a summary (tensors, bytes).

    ``osum_config`` (OSUM's model YAML) and ``llm_config`` (a Qwen2 directory or ``config.json``) give the
    settings; every one of them must agree with ``config`` + ``overrides`` (a list of differences otherwise).
    ``prompts`` (OSUM's ``prompt_config.yaml`` format) is stored with the checkpoint: export-torch ships it and
    osum-train uses it by default. The files' SHA-256 are recorded in the checkpoint's layout."""
    from .osum_config import (
        config_from_sources,
        import_output,
        osum_yaml_fields,
        qwen2_config_path,
        qwen2_fields,
        sha256,
    )

    if config is None and osum_config is None:
        raise ConfigError("import-osum needs --osum-config (OSUM's model YAML) and/or --config")
    sources = []
    origin: dict[str, Any] = {}
    if osum_config is not None:
        sources.append((str(osum_config), osum_yaml_fields(osum_config)))
        origin["osum_config"] = {"path": str(Path(osum_config).resolve()), "sha256": sha256(osum_config)}
    if llm_config is not None:
        sources.append((str(qwen2_config_path(llm_config)), {"model": {"llm": qwen2_fields(llm_config)}}))
        origin["llm_config"] = {"path": str(qwen2_config_path(llm_config).resolve()),
                                "sha256": sha256(qwen2_config_path(llm_config))}
    cfg = config_from_sources(config, overrides, sources) if sources else load_config(config, overrides)
    out, book = import_output(out, force, prompts, origin)
    with TorchPtSource(pt) as src:
        meta = {k: (src.shape(k), src.dtype(k)) for k in src.keys()}
        plan = plan_import(meta, cfg.model, ck.model_shapes(cfg), source=str(pt))
        check_aliases(src, plan.aliases)
        n_tensors = len(meta) - len(plan.aliases)
        total = sum(src.nbytes(k) for k in meta if k not in plan.aliases)
        bar = Progress("import-osum", total, n_tensors, progress)
        try:
            params = {path: streamed_leaf(src, items, plan.shapes[path], plan.dtypes[path], bar)
                      for path, items in plan.leaves.items()}
            extras = {k: array_leaf(np.array(src.numpy(k)), bar) for k in plan.extras}
            layout = {"source": {"kind": "osum-pt", "path": str(Path(pt).resolve()), "bytes": file_size(pt),
                                 **origin}, "keys": plan.layout}
            write_checkpoint_atomic(out, force, params, cfg, extras, layout, bar, prompts=book)
        finally:
            bar.close()
    return {"tensors": n_tensors, "bytes": total, "aliases": len(plan.aliases), "extras": len(plan.extras)}
