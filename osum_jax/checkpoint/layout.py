"""The one on-disk checkpoint layout, shared by ``osum-convert`` and ``osum-train``.

A checkpoint is an orbax ``CheckpointManager`` directory; each step directory holds items::

    CKPT/STEP/
      params/       orbax PyTree: the OSUM model's variables (Param, LoRAParam, Buffer) as nested dicts of the
                    dotted paths of ``flat_variables(OSUM)`` ("encoder" -> "layers" -> "fc1" -> "kernel"). Restore
                    casts to the model's ``param_dtype``.
      config/       JSON: ``Config.to_dict()`` (the full config the weights belong to)
    converter checkpoints (``osum-convert import-*``, step 0) add
      extras/       orbax PyTree: source tensors that are not model variables, by their torch key split on dots
      osum_layout/  JSON: the OSUM key list in file order with dtype, shape and role (param/alias/extra), the
                    source file; lets ``export-osum`` rebuild the original ``.pt`` bit-exactly
    training runs (``osum-train``: ``OUT/checkpoints/STEP``, see :mod:`osum_jax.checkpoint.run`) add
      opt/          orbax PyTree: the optax state
      data/         the Grain iterator state, one JSON file per process
      meta/         JSON: step counters and the process/worker layout of the data state

So a run checkpoint *is* a model checkpoint: every reader here (:func:`read_config`, :func:`restore_params`,
:func:`lazy_leaves`, :func:`load_model`) takes a converter checkpoint, a run's output directory, its
``checkpoints`` folder or one step directory, relative or absolute (:func:`resolve`). Runs written before the
weights item had one name (``model``, config only inside ``meta``) are still read.

Reading restores against abstract targets with explicit shardings (a checkpoint written on one topology restores
on another; environment.md gotcha 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from ..config import Config, ConfigError

from ..config_loading import config_from_dict
from .store import LAYOUT_FORMAT, nest, open_stored_array
from .tree import CheckpointMismatch, flat_variables, load_flat

WEIGHTS = "params"  # the weights item of every checkpoint
_LEGACY_WEIGHTS = "model"  # runs written before the layouts were one
MODEL_ITEMS = (WEIGHTS, "config")
CONVERTER_ITEMS = MODEL_ITEMS + ("extras", "osum_layout")


class CheckpointError(ValueError):
    """A JAX checkpoint is missing, incomplete or unreadable (message names the directory)."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists/tuples, e.g. optax states, keyed by index) -> ``{dotted path: leaf}``."""
    out = {}
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    for k, v in items:
        if isinstance(v, (Mapping, list, tuple)):
            out.update(flatten(v, f"{prefix}{k}."))
        elif v is not None:  # empty optax states are stored as None
            out[f"{prefix}{k}"] = v
    return out


# -- reading --------------------------------------------------------------------------------------------------------


def resolve(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """``(manager root, step)``, the root absolute, for a checkpoint root (newest step unless ``step``), a step
    directory, or an ``osum-train`` output directory (its ``checkpoints`` folder)."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "checkpoints").is_dir() and not (path / "_CHECKPOINT_METADATA").exists():
        path = path / "checkpoints"  # an osum-train run
    if (path / "_CHECKPOINT_METADATA").exists() and path.name.isdigit():
        root, found = path.parent, int(path.name)
        if step is not None and step != found:
            raise CheckpointError(f"{path} is step {found}, not step {step}")
        return root, found
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())
    if not steps:
        raise CheckpointError(f"{path}: not an orbax checkpoint (no finished step directories)")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise CheckpointError(f"{path}: no step {step} (steps: {steps})")
    return path, step


def _step_dir(path: str | Path, step: int | None) -> Path:
    root, s = resolve(path, step)
    return root / str(s)


def _json_item(path: str | Path, step: int | None, item: str) -> dict:
    d = _step_dir(path, step) / item
    f = d / "metadata"
    if not f.is_file():
        raise CheckpointError(f"{d}: item {item!r} is missing")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: corrupt JSON ({e})") from None


def weights_item(path: str | Path, step: int | None = None) -> str:
    """The name of the weights item of ``step`` (``params``; ``model`` in runs of the earlier layout)."""
    d = _step_dir(path, step)
    return _LEGACY_WEIGHTS if not (d / WEIGHTS).is_dir() and (d / _LEGACY_WEIGHTS).is_dir() else WEIGHTS


def is_run_step(path: str | Path, step: int | None = None) -> bool:
    """True when ``step`` was written by ``osum-train`` (it has an optimizer state)."""
    return (_step_dir(path, step) / "opt").is_dir()


def read_config(path: str | Path, step: int | None = None, overrides=()) -> Config:
    """The :class:`~osum_jax.config.Config` stored with ``step`` (newest by default), plus ``overrides``."""
    d = _step_dir(path, step)
    if not (d / "config").is_dir() and (d / "meta" / "metadata").is_file():  # earlier run layout
        return config_from_dict(_json_item(path, step, "meta")["config"], overrides, source=f"{d}/meta")
    return config_from_dict(_json_item(path, step, "config"), overrides, source=f"{d}/config")


def steps(path: str | Path) -> list[int]:
    root, _ = resolve(path)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def read_layout(path: str | Path, step: int | None = None) -> dict:
    """The ``osum_layout`` item of ``step``, or of the newest earlier step that has one (a trainer's steps
    need not copy it)."""
    root, s = resolve(path, step)
    candidates = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and int(p.name) <= s),
                        reverse=True)
    for c in candidates:
        if (root / str(c) / "osum_layout" / "metadata").is_file():
            layout = _json_item(root, c, "osum_layout")
            if layout.get("format") != LAYOUT_FORMAT:
                raise CheckpointError(f"{root / str(c)}: unknown osum_layout format {layout.get('format')!r}")
            return dict(layout, step=c)
    raise CheckpointError(f"{root}: no step <= {s} has an osum_layout item")


def _along_init_chain(path: str | Path, step: int | None, get):
    """``get(root, step)`` on ``path``, or for a run without the thing, on the checkpoint its ``train.init_from``
    started from, followed through runs started from runs; None when ``get`` raises :class:`CheckpointError`
    (or returns None) all along the chain."""
    seen: set[tuple[Path, int]] = set()
    while True:
        try:
            root, s = resolve(path, step)
        except CheckpointError:
            return None
        if (root, s) in seen:
            return None
        seen.add((root, s))
        try:
            found = get(root, s)
        except CheckpointError:
            found = None
        if found is not None:
            return found
        try:
            init = read_config(root, s).train.init_from
        except (CheckpointError, ConfigError):
            return None
        if not init:
            return None
        path, step = init, None


def read_prompts(path: str | Path, step: int | None = None) -> dict | None:
    """The ``prompts`` item (``{"prompts": {task: [...]}, "source": ..., "sha256": ...}``) stored with a converter
    checkpoint, or for a run with the checkpoint its ``train.init_from`` chain started from; None if none has one."""
    return _along_init_chain(path, step, lambda root, s: _json_item(root, s, "prompts")
                             if (root / str(s) / "prompts" / "metadata").is_file() else None)


def find_layout(path: str | Path, step: int | None = None) -> tuple[Path, dict] | None:
    """``(checkpoint root, layout)`` of the ``osum_layout`` that describes ``path``'s weights: its own, or for a
    run (no layout of its own) the one of the checkpoint its ``train.init_from`` started from, followed through
    runs started from runs; ``None`` when the chain ends without one (trained from scratch, or a moved source)."""
    return _along_init_chain(path, step, lambda root, s: (root, read_layout(root, s)))


def leaf_metadata(path: str | Path, step: int | None = None, item: str | None = None) -> dict[str, Any]:
    """``{dotted path: ArrayMetadata}`` of an orbax PyTree item (the weights by default), without reading data."""
    d = _step_dir(path, step) / (item or weights_item(path, step))
    if not d.is_dir():
        raise CheckpointError(f"{d}: item {item!r} is missing")
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(d)
    except Exception as e:
        raise CheckpointError(f"{d}: cannot read orbax metadata ({type(e).__name__}: {e})") from None
    return flatten(meta.tree)


def item_store_format(d: Path) -> tuple[bool, bool]:
    """``(use_zarr3, use_ocdbt)`` of an orbax PyTree item directory."""
    try:
        use_zarr3 = bool(getattr(ocp.PyTreeCheckpointHandler().metadata(d), "use_zarr3", False))
    except Exception as e:
        raise CheckpointError(f"{d}: cannot read orbax metadata ({type(e).__name__}: {e})") from None
    return use_zarr3, (d / "manifest.ocdbt").exists()


def open_leaf(path: str | Path, step: int | None, name: str, item: str = WEIGHTS, meta=None,
              store_format: tuple[bool, bool] | None = None) -> ts.TensorStore:
    """A TensorStore handle on one stored leaf (read slices of it without restoring the whole array). ``meta``
    (:func:`leaf_metadata`) and ``store_format`` (:func:`item_store_format`) may be passed in when opening many
    leaves of one item, so its metadata is read once."""
    d = _step_dir(path, step) / item
    meta = meta or leaf_metadata(path, step, item)
    if name not in meta:
        raise CheckpointError(f"{d}: no leaf {name!r}")
    use_zarr3, use_ocdbt = store_format or item_store_format(d)
    try:
        return open_stored_array(d, name, use_zarr3, use_ocdbt)
    except Exception as e:
        raise CheckpointError(f"{d}: cannot open leaf {name!r} ({type(e).__name__}: {e})") from None


def abstract_model(cfg: Config):
    from ..models import OSUM  # the model package is heavy; readers of metadata only never import it

    return nnx.eval_shape(lambda: OSUM(cfg.model, rngs=nnx.Rngs(0)))


def model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_variables(abstract_model(cfg)).items()}


def restore_params(path: str | Path, step: int | None = None, cfg: Config | None = None, *,
                   dtype: str | None = None, device=None,
                   shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
    """``{dotted path: jax.Array}`` of ``step``, cast to ``dtype`` (default: the config's ``param_dtype``).

    Restores against abstract targets with explicit shardings, so it works whatever topology wrote the
    checkpoint: ``shardings[name]`` where given (e.g. a training mesh: each process reads only the shards its
    devices hold, and no host ever holds the whole model), else a single ``device`` (default: the first CPU).
    """
    cfg = cfg or read_config(path, step)
    root, s = resolve(path, step)
    item = weights_item(root, s)
    device = device or jax.devices("cpu")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    dt = jnp.dtype(dtype or cfg.model.param_dtype)
    shapes = check_leaves(leaf_metadata(root, s, item), cfg, f"{root / str(s)}/{item}")
    shardings = shardings or {}
    target = nest({k: jax.ShapeDtypeStruct(v, dt, sharding=shardings.get(k, sharding)) for k, v in shapes.items()})
    try:
        with ocp.CheckpointManager(root) as mgr:
            out = mgr.restore(s, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
    except Exception as e:
        raise CheckpointError(f"{root / str(s)}: cannot restore {item} ({type(e).__name__}: {e})") from None
    return flatten(out)


class LazyLeaf:
    """One stored array, read from disk only when asked: ``shape``, ``dtype``, ``leaf[i]`` (e.g. one layer of a
    stacked variable) and ``get_value()`` (all of it). Lets an exporter stream a checkpoint tensor by tensor."""

    def __init__(self, store: ts.TensorStore, where: str):
        self.store, self.where = store, where
        self.shape = tuple(int(n) for n in store.shape)
        self.dtype = store.dtype.numpy_dtype

    def _read(self, index) -> np.ndarray:
        try:
            return np.asarray(self.store[index].read().result())
        except Exception as e:
            raise CheckpointError(f"{self.where}: cannot read ({type(e).__name__}: {e})") from None

    def __getitem__(self, index) -> np.ndarray:
        return self._read(index)

    def get_value(self) -> np.ndarray:
        return self._read(...)


def lazy_leaves(path: str | Path, step: int | None = None, item: str | None = None) -> dict[str, LazyLeaf]:
    """``{dotted path: LazyLeaf}`` of an orbax PyTree item (the weights by default); nothing is read until a leaf
    is indexed."""
    root, s = resolve(path, step)
    item = item or weights_item(root, s)
    meta = leaf_metadata(root, s, item)
    fmt = item_store_format(root / str(s) / item)
    return {name: LazyLeaf(open_leaf(root, s, name, item, meta, fmt), f"{root / str(s) / item}:{name}")
            for name in meta}


def check_leaves(leaves: Mapping[str, Any], cfg: Config, where: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of stored leaves == the model ``cfg`` describes (raises :class:`CheckpointMismatch`);
    returns the model's ``{dotted path: shape}``."""
    shapes = model_shapes(cfg)
    problems = []
    missing, unexpected = sorted(set(shapes) - set(leaves)), sorted(set(leaves) - set(shapes))
    if missing:
        problems.append(f"missing: {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected: {unexpected[:20]}")
    problems += [f"{k}: stored {tuple(leaves[k].shape)} != config {shapes[k]}" for k in shapes
                 if k in leaves and tuple(leaves[k].shape) != shapes[k]]
    if problems:
        raise CheckpointMismatch(f"{where} does not match its config:\n  " + "\n  ".join(problems))
    return shapes


def restore_extras(path: str | Path, step: int) -> dict[str, np.ndarray]:
    """The ``extras`` item as numpy arrays in their stored dtype (small tensors); ``{}`` when the checkpoint has
    none (a source without OSUM's unused ``ln_speech`` / ``speaker_head`` tensors)."""
    if not (_step_dir(path, step) / "extras").is_dir():
        return {}
    meta = leaf_metadata(path, step, "extras")
    fmt = item_store_format(_step_dir(path, step) / "extras")
    out = {}
    for name in meta:
        out[name] = open_leaf(path, step, name, "extras", meta, fmt).read().result()
    return out


def load_model(path: str | Path, step: int | None = None, overrides=(), *, dtype: str | None = None):
    """``(OSUM model, Config)`` from a checkpoint: the stored config (plus ``overrides``) and its params."""
    cfg = read_config(path, step, overrides)
    model = abstract_model(cfg)
    load_flat(model, restore_params(path, step, cfg, dtype=dtype), source=str(path))
    return model, cfg
