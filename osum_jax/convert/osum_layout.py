"""OSUM's key layout of a JAX checkpoint, shared by the commands: the canonical layout that ``import-hf`` records
(:func:`canonical_layout`, with freshly initialised unused tensors, :func:`fresh_extras`) and what ``export-osum``
and ``average`` read back (:func:`osum_export_source`). The key table itself is :data:`.osum_pt.OSUM`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import checkpoint as ck
from ..config import Config
from .osum_pt import ALIASES, canonical_keys, extra_shapes, normalize_osum_key, osum_table
from .sources import dtype_name


def fresh_extras(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """OSUM's unused ``ln_speech`` (LayerNorm init) and ``speaker_head`` (torch Linear init), float32."""
    shapes = extra_shapes(cfg.model)
    rng = np.random.default_rng(seed + 2)
    bound = 1.0 / math.sqrt(cfg.model.llm.hidden_size)
    return {"ln_speech.weight": np.ones(shapes["ln_speech.weight"], np.float32),
            "ln_speech.bias": np.zeros(shapes["ln_speech.bias"], np.float32),
            "speaker_head.weight": rng.uniform(-bound, bound, shapes["speaker_head.weight"]).astype(np.float32),
            "speaker_head.bias": rng.uniform(-bound, bound, shapes["speaker_head.bias"]).astype(np.float32)}


def canonical_layout(cfg: Config, leaf_dtypes: Mapping[str, np.dtype], extras: Mapping[str, np.ndarray]) -> list:
    """The ``osum_layout`` keys of a checkpoint without an OSUM source: OSUM's canonical key order (peft >= 0.7
    names), each tensor in the dtype ``leaf_dtypes`` gives its variable, the ``extras`` as given."""
    by_key = {e.torch_key: e for e in osum_table(cfg.model)}
    shapes = ck.model_shapes(cfg)
    out = []
    for key in canonical_keys(cfg.model):
        if key in ALIASES:
            e = by_key[normalize_osum_key(ALIASES[key])]
            out.append({"key": key, "dtype": dtype_name(leaf_dtypes[e.jax_path]), "role": "alias",
                        "of": ALIASES[key], "shape": list(e.external_shape(shapes[e.jax_path]))})
        elif key in extras:
            out.append({"key": key, "dtype": dtype_name(extras[key].dtype), "role": "extra",
                        "shape": list(extras[key].shape)})
        else:
            e = by_key[normalize_osum_key(key)]
            out.append({"key": key, "dtype": dtype_name(leaf_dtypes[e.jax_path]), "role": "param",
                        "shape": list(e.external_shape(shapes[e.jax_path]))})
    return out


@dataclass
class OsumExportSource:
    """What export-osum reads: the weights (``item`` of ``root``/``step``), their config, and the OSUM key layout
    (key order, dtypes, roles) with the extras (``ln_speech``/``speaker_head``) it came with."""

    root: Path
    step: int
    item: str  # the weights item (``params``; ``model`` in runs of the earlier layout)
    cfg: Config
    layout: dict
    extras: dict[str, np.ndarray]
    layout_origin: str  # where the layout came from, for messages


def osum_export_source(ckpt: str | Path, step: int | None = None,
                       layout_from: str | Path | None = None) -> OsumExportSource:
    """Resolve what :func:`export_osum` exports.

    * a converter checkpoint (import-osum / import-hf): its ``params`` and its own ``osum_layout``/``extras``;
    * an osum-train run directory: its ``model`` item at ``step`` (newest by default) and the layout/extras of
      the converter checkpoint it started from (``train.init_from``, followed through runs started from runs);
      a run trained from scratch gets OSUM's canonical key order (as import-hf writes it) with each tensor in
      its stored dtype and freshly initialised ``ln_speech``/``speaker_head`` (unused by OSUM's forward pass).

    ``layout_from`` names the converter checkpoint whose layout/extras to use instead (e.g. when the run's
    ``init_from`` moved)."""
    root, s = ck.resolve(ckpt, step)
    cfg, item = ck.read_config(root, s), ck.weights_item(root, s)
    if layout_from is not None:
        lroot, ls = ck.resolve(layout_from)
        found: tuple[Path, dict] | None = (lroot, ck.read_layout(lroot, ls))
    elif not ck.is_run_step(root, s):
        found = (root, ck.read_layout(root, s))
    else:
        found = ck.find_layout(root, s)
    if found is not None:
        lroot, layout = found
        return OsumExportSource(root, s, item, cfg, layout, ck.restore_extras(lroot, layout["step"]),
                                f"{lroot}/{layout['step']}/osum_layout")
    meta = ck.leaf_metadata(root, s, item)
    extras = fresh_extras(cfg, 0)
    keys = canonical_layout(cfg, {p: m.dtype for p, m in meta.items()}, extras)
    return OsumExportSource(root, s, item, cfg, {"keys": keys, "source": {"kind": "canonical"}}, extras,
                            "OSUM's canonical key order (the run has no train.init_from with an osum_layout)")
