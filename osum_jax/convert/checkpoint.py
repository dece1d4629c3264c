"""The JAX checkpoint written by ``osum-convert``: an orbax ``CheckpointManager`` directory.

Layout (one step, ``0`` for a conversion; a trainer adds its own steps beside it)::

    CKPT/
      0/
        params/       orbax PyTree: the OSUM model's variables (Param, LoRAParam, Buffer) as nested dicts of
                      the dotted paths of ``flat_variables(OSUM)`` ("encoder" -> "layers" -> "fc1" -> "kernel"),
                      in the dtype of the source tensors (bfloat16 for OSUM's release). Restore casts to the
                      model's ``param_dtype``.
        config/       JSON: ``Config.to_dict()`` (the full config the checkpoint was converted for)
        extras/       orbax PyTree: source tensors that are not model variables, by their torch key split on
                      dots (``ln_speech.weight`` -> "ln_speech" -> "weight"), in their source dtype
        osum_layout/  JSON: the OSUM key list in file order with dtype, shape and role (param/alias/extra),
                      the source file; lets ``export-osum`` rebuild the original ``.pt`` bit-exactly

Writing streams: every leaf is an :class:`StreamedArray` whose blocks (one layer of a stacked variable, or a
band of rows of a large table) are produced on demand from the memory-mapped source and written with
TensorStore one block at a time, so a conversion holds about one block in memory, never the whole model.
The on-disk format is orbax's own (OCDBT + zarr, written through orbax's ``NumpyHandler`` specs): any orbax
reader restores it, e.g. ``ocp.args.StandardRestore`` against abstract targets.

Reading restores against abstract single-device targets with explicit shardings (a checkpoint written on one
topology restores on another; environment.md gotcha 3).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from ..config import Config, config_from_dict
from .sources import np_dtype
from .tree import CheckpointMismatch, flat_variables, load_flat

LAYOUT_FORMAT = "osum-jax/osum-layout/1"
ITEMS = ("params", "config", "extras", "osum_layout")


class CheckpointError(ValueError):
    """A JAX checkpoint is missing, incomplete or unreadable (message names the directory)."""


# -- streamed leaves ----------------------------------------------------------------------------------------------


class StreamedArray:
    """A checkpoint leaf whose data is produced block by block at write time.

    ``blocks()`` yields ``(index, array)`` pairs covering the array exactly once; ``index`` is a tuple of ints
    and slices for the leading axes. ``block_shape`` is the zarr chunk shape (the largest block).
    """

    def __init__(self, shape, dtype, blocks: Callable[[], Iterator[tuple[tuple, np.ndarray]]],
                 block_shape: tuple[int, ...] | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self.block_shape = tuple(block_shape) if block_shape is not None else self.shape
        self._blocks = blocks

    def blocks(self) -> Iterator[tuple[tuple, np.ndarray]]:
        return self._blocks()

    @classmethod
    def of(cls, array: np.ndarray) -> "StreamedArray":
        return cls(array.shape, array.dtype, lambda: iter([((), array)]))


_progress: Callable[[int], None] | None = None  # set while a conversion writes (bytes written)


class _StreamedHandler(ocp.type_handlers.NumpyHandler):
    """Writes :class:`StreamedArray` leaves with the specs orbax uses for numpy arrays, block by block.

    Leaves are written one after another (not concurrently), so only one block is in flight.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.block_shape, dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
            t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            for index, block in value.blocks():
                if block.dtype != value.dtype:
                    raise CheckpointMismatch(f"{info.name}: block dtype {block.dtype} != leaf dtype {value.dtype}")
                await t[index].write(block)
                if _progress is not None:
                    _progress(block.nbytes)
                del block


def _register() -> None:
    # orbax logs a warning because our handler shares the 'np.ndarray' type string on purpose (the leaves
    # are numpy arrays on disk); silence it for this one call
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(StreamedArray, _StreamedHandler(), override=True)
    finally:
        absl_logger.setLevel(level)


_register()


def nest(flat: Mapping[str, Any]) -> dict:
    """``{"a.b.c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


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


# -- atomic output ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` (a file or a directory).

    Refuses an existing ``out`` unless ``force``. On failure the temporary is removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


# -- writing --------------------------------------------------------------------------------------------------------


def write_checkpoint(directory: Path, params: Mapping[str, StreamedArray], config: Config,
                     extras: Mapping[str, StreamedArray], layout: Mapping[str, Any], *, step: int = 0,
                     progress: Callable[[int], None] | None = None) -> None:
    """Write one step of a new checkpoint into ``directory`` (which must not exist). Synchronous."""
    global _progress
    _progress = progress
    try:
        with ocp.CheckpointManager(
                directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        ) as mgr:
            items = dict(params=ocp.args.PyTreeSave(nest(params)), config=ocp.args.JsonSave(config.to_dict()),
                         osum_layout=ocp.args.JsonSave(dict(layout, format=LAYOUT_FORMAT)))
            if extras:  # orbax refuses an empty PyTree item ("Found empty item"); no extras = no item
                items["extras"] = ocp.args.PyTreeSave(nest(extras))
            mgr.save(step, args=ocp.args.Composite(**items))
            mgr.wait_until_finished()
    finally:
        _progress = None


# -- reading --------------------------------------------------------------------------------------------------------


def resolve(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """``(manager root, step)`` for a checkpoint root (newest step unless ``step``) or a step directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
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


def read_config(path: str | Path, step: int | None = None, overrides=()) -> Config:
    return config_from_dict(_json_item(path, step, "config"), overrides, source=f"{path} config")


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


def leaf_metadata(path: str | Path, step: int | None = None, item: str = "params") -> dict[str, Any]:
    """``{dotted path: ArrayMetadata}`` of an orbax PyTree item, without reading data."""
    d = _step_dir(path, step) / item
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


def open_leaf(path: str | Path, step: int | None, name: str, item: str = "params", meta=None,
              store_format: tuple[bool, bool] | None = None) -> ts.TensorStore:
    """A TensorStore handle on one stored leaf (read slices of it without restoring the whole array). ``meta``
    (:func:`leaf_metadata`) and ``store_format`` (:func:`item_store_format`) may be passed in when opening many
    leaves of one item, so its metadata is read once."""
    d = _step_dir(path, step) / item
    meta = meta or leaf_metadata(path, step, item)
    if name not in meta:
        raise CheckpointError(f"{d}: no leaf {name!r}")
    use_zarr3, use_ocdbt = store_format or item_store_format(d)
    spec = ts_utils.ArrayReadSpec(str(d), name, use_zarr3, use_ocdbt=use_ocdbt).json
    try:
        return ts.open(spec, open=True, context=ts_utils.get_ts_context(use_ocdbt=use_ocdbt)).result()
    except Exception as e:
        raise CheckpointError(f"{d}: cannot open leaf {name!r} ({type(e).__name__}: {e})") from None


def abstract_model(cfg: Config):
    from ..models import OSUM

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
    device = device or jax.devices("cpu")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    dt = np.dtype(dtype or cfg.model.param_dtype) if (dtype or cfg.model.param_dtype) != "bfloat16" else \
        np_dtype("bfloat16")
    shapes = check_leaves(leaf_metadata(root, s), cfg, f"{root / str(s)}/params")
    shardings = shardings or {}
    target = nest({k: jax.ShapeDtypeStruct(v, dt, sharding=shardings.get(k, sharding)) for k, v in shapes.items()})
    try:
        with ocp.CheckpointManager(root) as mgr:
            out = mgr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:
        raise CheckpointError(f"{root / str(s)}: cannot restore params ({type(e).__name__}: {e})") from None
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


def lazy_leaves(path: str | Path, step: int | None = None, item: str = "params") -> dict[str, LazyLeaf]:
    """``{dotted path: LazyLeaf}`` of an orbax PyTree item (``params`` of a converter checkpoint, ``model`` of an
    ``osum-train`` run's ``checkpoints`` directory); nothing is read until a leaf is indexed."""
    root, s = resolve(path, step)
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
