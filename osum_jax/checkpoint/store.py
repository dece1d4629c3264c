"""Writing the one checkpoint layout (:mod:`osum_jax.checkpoint.layout`) by streaming.

Every leaf is a :class:`StreamedArray` whose blocks (one layer of a stacked variable, or a band of rows of a large
table) are produced on demand from the memory-mapped source and written with TensorStore one block at a time, so a
conversion holds about one block in memory, never the whole model. The on-disk format is orbax's own (OCDBT + zarr,
written with the specs orbax's ``NumpyHandler`` uses): any orbax reader restores it.

Streaming needs orbax's TensorStore spec builders (``orbax.checkpoint._src``): orbax has no public API for writing
(or reading a slice of) one array block by block. They are used here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from osum_torch_infer.files import atomic_file

from ..config import Config
from .tree import CheckpointMismatch

LAYOUT_FORMAT = "osum-jax/osum-layout/1"


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


# -- atomic output ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` (a file or a directory), fsynced:
    :func:`osum_torch_infer.files.atomic_file`, the one atomic write.

    Refuses an existing ``out`` unless ``force``. On failure the temporary is removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    if out.parent.exists() and not out.parent.is_dir():
        raise FileExistsError(f"{out.parent} is a file, not a directory")
    with atomic_file(out) as tmp:  # parents made, as the README writes it: --out ckpt/osum
        yield tmp


# -- writing --------------------------------------------------------------------------------------------------------


def write_checkpoint(directory: Path, params: Mapping[str, StreamedArray], config: Config,
                     extras: Mapping[str, StreamedArray], layout: Mapping[str, Any], *, step: int = 0,
                     progress: Callable[[int], None] | None = None, prompts: Mapping[str, Any] | None = None) -> None:
    """Write one step of a new checkpoint into ``directory`` (which must not exist). Synchronous."""
    global _progress
    _progress = progress
    try:
        with ocp.CheckpointManager(
                Path(directory).absolute(), options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        ) as mgr:
            items = dict(params=ocp.args.PyTreeSave(nest(params)), config=ocp.args.JsonSave(config.to_dict()),
                         osum_layout=ocp.args.JsonSave(dict(layout, format=LAYOUT_FORMAT)))
            if prompts:  # the prompt book the weights were trained with (OSUM's prompt_config.yaml format)
                items["prompts"] = ocp.args.JsonSave(dict(prompts))
            if extras:  # orbax refuses an empty PyTree item ("Found empty item"); no extras = no item
                items["extras"] = ocp.args.PyTreeSave(nest(extras))
            mgr.save(step, args=ocp.args.Composite(**items))
            mgr.wait_until_finished()
    finally:
        _progress = None




def open_stored_array(item_dir: Path, name: str, use_zarr3: bool, use_ocdbt: bool) -> ts.TensorStore:
    """A TensorStore handle on leaf ``name`` of the orbax PyTree item in ``item_dir`` (read slices on demand)."""
    spec = ts_utils.ArrayReadSpec(str(item_dir), name, use_zarr3, use_ocdbt=use_ocdbt).json
    return ts.open(spec, open=True, context=ts_utils.get_ts_context(use_ocdbt=use_ocdbt)).result()
