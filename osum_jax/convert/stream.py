"""Streaming a planned import into the one checkpoint layout: progress, row bands, leaves, atomic write."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from osum_torch_infer.progress import progress_bar

from .. import checkpoint as ck
from ..checkpoint.tree import CheckpointMismatch
from ..config import Config
from .rules import Entry
from .sources import TensorSource, np_dtype, row_blocks

BLOCK_BYTES = 64 << 20  # large matrices are streamed in bands of at most this many bytes


class Progress:
    """A bar over bytes with a tensor counter (:func:`osum_torch_infer.progress.progress_bar`; silent when
    ``enabled`` is False)."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
        self.tensors, self.total_tensors = 0, total_tensors
        self.bar = None
        if enabled:
            self.bar = progress_bar(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
            self._postfix()

    def _postfix(self):
        self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors")

    def bytes(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def tensor(self, n: int = 1) -> None:
        self.tensors += n
        if self.bar is not None:
            self._postfix()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -- streaming a planned leaf ---------------------------------------------------------------------------------------


def bands(src: TensorSource, key: str, tr) -> list[slice] | None:
    """Row bands of a large 2-D source tensor (``id``/``linear`` transforms), or None to take it whole."""
    shape = src.shape(key)
    if len(shape) != 2 or tr.name not in ("id", "linear") or src.nbytes(key) <= BLOCK_BYTES:
        return None
    return list(row_blocks(shape[0], src.nbytes(key) // shape[0], BLOCK_BYTES))


def streamed_leaf(src: TensorSource, items: Sequence[tuple[str, Entry]], shape: tuple[int, ...], dtype: str,
                   progress: Progress) -> ck.StreamedArray:
    """A leaf whose blocks come from ``src``: one per layer, split into row bands of at most ``BLOCK_BYTES``
    for large matrices (torch rows are the columns of a JAX ``[in, out]`` kernel)."""
    npdt = np_dtype(dtype)
    lead = (0,) if items[0][1].layer is not None else ()
    key0, e0 = items[0]
    bands0 = bands(src, key0, e0.transform)
    if bands0 is None:
        block_shape = (1,) * len(lead) + tuple(shape[len(lead):])
    else:
        width = bands0[0].stop - bands0[0].start
        inner = (width, shape[-1]) if e0.transform.name == "id" else (shape[-2], width)
        block_shape = (1,) * len(lead) + inner

    def blocks():
        for key, e in items:
            at = (e.layer,) if lead else ()
            row_bands = bands(src, key, e.transform)
            if row_bands is None:
                yield at, e.transform.forward(src.numpy(key))
            else:
                for rows in row_bands:
                    part = src.numpy(key, rows)
                    if e.transform.name == "id":
                        yield at + (rows,), part
                    else:
                        yield at + (slice(None), rows), np.ascontiguousarray(part.T)
                    src.release(key)
            src.release(key)
            progress.tensor()
    return ck.StreamedArray(shape, npdt, blocks, block_shape)


def array_leaf(array: np.ndarray, progress: Progress | None = None) -> ck.StreamedArray:
    def blocks():
        yield (), array
        if progress is not None:
            progress.tensor()
    return ck.StreamedArray(array.shape, array.dtype, blocks)


def check_aliases(src: TensorSource, aliases: Mapping[str, str]) -> None:
    """OSUM saves ``embed_tokens.weight``/``lm_head.weight`` as aliases: they must equal their originals."""
    for alias, target in aliases.items():
        if src.same_storage(alias, target):
            continue
        n = src.shape(target)[0] if src.shape(target) else 1
        row_bytes = src.nbytes(target) // max(n, 1)
        for rows in row_blocks(n, row_bytes, BLOCK_BYTES):
            a, b = src.numpy(alias, rows), src.numpy(target, rows)
            if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                raise CheckpointMismatch(
                    f"{src.path}: {alias} differs from {target} (rows {rows.start}..{rows.stop}); OSUM saves them "
                    f"as one tensor, so this file was edited or is corrupt")
            src.release(alias)
            src.release(target)


def write_checkpoint_atomic(out: str | Path, force: bool, params, cfg: Config, extras, layout, progress: Progress,
           prompts: dict | None = None) -> None:
    with ck.atomic_output(out, force) as tmp:
        ck.write_checkpoint(tmp, params, cfg, extras, layout, progress=progress.bytes, prompts=prompts)


def sum_bytes(leaves: Mapping[str, ck.StreamedArray]) -> int:
    return sum(v.nbytes for v in leaves.values())
