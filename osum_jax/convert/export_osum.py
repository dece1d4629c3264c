"""``osum-convert export-osum``: a JAX checkpoint or osum-train run -> OSUM's flat ``.pt`` (keys, order, dtypes of
the imported file), written as a torch zip with streamed tensors."""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .. import checkpoint as ck
from ..checkpoint.tree import CheckpointMismatch
from . import stream
from .osum_layout import osum_export_source  # also this module's public name (average, tests)
from .osum_pt import export_sources
from .rules import Entry
from .sources import np_dtype, row_blocks, torch_dtype
from .stream import Progress


def _cast(a: np.ndarray, dtype: str, key: str) -> np.ndarray:
    target = np_dtype(dtype)
    if a.dtype == target:
        return a
    out = a.astype(target)
    if dtype == "float16":
        over = np.isfinite(a.astype(np.float32)) & ~np.isfinite(out.astype(np.float32))
        if over.any():
            raise OverflowError(f"{key}: {int(over.sum())} value(s) exceed the float16 range "
                                f"(max |x| = {float(np.abs(a.astype(np.float32)).max()):.4g}); export bf16 or fp32")
    return out


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _zip_records(f) -> Iterator[tuple[int, int, int, int]]:
    """``(payload offset, payload size, CRC-32, central directory entry offset)`` of each record of the zip
    archive ``f`` (a seekable binary file), in central directory order."""
    import zipfile

    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(size - 22)
    sig, _, _, _, n, cd_size, cd_off, comment = struct.unpack("<IHHHHIIH", f.read(22))
    if sig != 0x06054B50 or comment:
        raise ck.CheckpointError(f"{f.name}: unexpected zip end record")
    if cd_off == 0xFFFFFFFF or cd_size == 0xFFFFFFFF or n == 0xFFFF:  # zip64: locator, then the zip64 end record
        f.seek(size - 22 - 20)
        sig, _, end64, _ = struct.unpack("<IIQI", f.read(20))
        if sig == 0x07064B50:
            f.seek(end64)
            sig, *_, n, cd_size, cd_off = struct.unpack("<IQHHIIQQQQ", f.read(56))
        if sig != 0x06064B50:
            raise ck.CheckpointError(f"{f.name}: unexpected zip64 end record")
    infos = zipfile.ZipFile(f).infolist()  # decodes the zip64 extra fields (sizes, local header offsets)
    f.seek(cd_off)
    cd = f.read(cd_size)
    pos = 0
    for zi in infos:
        sig, = struct.unpack_from("<I", cd, pos)
        nl, el, cl = struct.unpack_from("<HHH", cd, pos + 28)
        if sig != 0x02014B50 or cd[pos + 46:pos + 46 + nl].decode() != zi.orig_filename:
            raise ck.CheckpointError(f"{f.name}: unexpected central directory entry at {cd_off + pos}")
        f.seek(zi.header_offset)
        sig, = struct.unpack("<I", f.read(4))
        f.seek(zi.header_offset + 26)
        lnl, lel = struct.unpack("<HH", f.read(4))
        if sig != 0x04034B50:
            raise ck.CheckpointError(f"{f.name}: unexpected local header at {zi.header_offset}")
        yield zi.header_offset + 30 + lnl + lel, zi.file_size, zi.CRC, cd_off + pos
        pos += 46 + nl + el + cl


def _set_crcs(path: Path, crcs: Mapping[int, int]) -> None:
    """Write the CRC-32 of the records whose payloads were filled after ``torch.save`` under ``skip_data``
    (keyed by payload offset) into their data descriptors and central directory entries, where that save
    left 0 (``torch.load`` does not check them; ``zipfile`` and other zip readers do)."""
    todo = dict(crcs)
    with open(path, "r+b") as f:
        for data, nbytes, crc, central in list(_zip_records(f)):
            if data not in todo:
                continue
            f.seek(data + nbytes)
            sig, old = struct.unpack("<II", f.read(8))
            if sig != 0x08074B50 or old != 0 or crc != 0:
                raise ck.CheckpointError(f"{path}: unexpected data descriptor at {data + nbytes}")
            new = struct.pack("<I", todo.pop(data))
            f.seek(data + nbytes + 4)
            f.write(new)
            f.seek(central + 16)
            f.write(new)
    if todo:
        raise ck.CheckpointError(f"{path}: no zip record at payload offset(s) {sorted(todo)[:5]}")


def export_osum(ckpt: str | Path, *, out: str | Path, step: int | None = None, force: bool = False,
                dtype: str | None = None, progress: bool = True,
                layout_from: str | Path | None = None) -> dict[str, Any]:
    """JAX checkpoint or osum-train run -> OSUM's flat ``.pt`` (keys, order, dtypes of the imported file; aliases
    shared). What is read from where: :func:`osum_export_source`.

    ``dtype`` (``bfloat16``/``float16``/``float32``) casts every tensor; by default each key keeps the dtype
    recorded at import (a run's trained float32 weights are then rounded to the layout's dtype, bf16 for
    OSUM's release; pass ``float32`` to keep them exact). The file is written by ``torch.save`` under ``torch.serialization.skip_data`` (pickle
    and zip records, with room reserved for the tensor bytes), then each tensor's bytes are read from the
    checkpoint one layer or band at a time and written (``pwrite``) at the offset that ``torch.load`` under
    ``FakeTensorMode`` reports for it (PyTorch's documented recipe for filling a ``skip_data`` checkpoint);
    the CRC-32 of each record is filled in last. Neither the model nor the output file is ever mapped into
    memory, so the peak RSS stays near the largest layer whatever the model size.
    """
    import torch

    if not hasattr(torch.serialization, "skip_data"):
        raise RuntimeError(f"export-osum needs torch >= 2.7 (torch.serialization.skip_data, storage offsets "
                           f"under FakeTensorMode); this is torch {torch.__version__}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    src = osum_export_source(ckpt, step, layout_from)
    root, s, item, cfg, layout, extras = src.root, src.step, src.item, src.cfg, src.layout, src.extras
    plan = export_sources(layout["keys"], cfg.model)
    meta = ck.leaf_metadata(root, s, item)
    shapes = ck.model_shapes(cfg)
    bad = [f"{p}: stored {tuple(meta[p].shape) if p in meta else None} != config {shapes[p]}" for p in shapes
           if p not in meta or tuple(meta[p].shape) != shapes[p]]
    if bad:
        raise CheckpointMismatch(f"{root / str(s)}/{item} does not match its config:\n  " + "\n  ".join(bad))
    recs = {r["key"]: r for r in layout["keys"]}
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    # shape and dtype of every stored tensor, known before any is read
    want: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for key, role, detail in plan:
        if role == "alias":
            continue
        if role == "extra":
            if key not in extras:
                raise ck.CheckpointError(f"{root}: the extras item lacks {key}")
            shape = tuple(extras[key].shape)
        else:
            shape = detail.external_shape(shapes[detail.jax_path])
        if list(shape) != list(recs[key]["shape"]):
            raise CheckpointMismatch(f"{key}: exported shape {list(shape)} != recorded {recs[key]['shape']}")
        want[key] = (shape, np_dtype(dtype or recs[key]["dtype"]))
    for key, role, detail in plan:
        if role == "alias" and detail not in want:
            raise CheckpointMismatch(f"{key} aliases {detail}, which is not exported")
    by_leaf: dict[str, list[tuple[str, Entry]]] = defaultdict(list)
    for key, role, detail in plan:
        if role == "param":
            by_leaf[detail.jax_path].append((key, detail))
    n_tensors = len(plan)
    total = sum(math.prod(sh) * dt.itemsize for sh, dt in want.values())
    bar = Progress("export-osum", total, n_tensors, progress)

    fmt = ck.item_store_format(root / str(s) / item)

    def sources() -> Iterator[tuple[str, Iterator[np.ndarray]]]:
        """``(key, blocks)`` for each stored tensor: its bytes in order, as C-contiguous arrays of the target
        dtype (whole tensors, or row bands of at most ``BLOCK_BYTES`` for large un-stacked matrices)."""
        for path, items in by_leaf.items():
            t = ck.open_leaf(root, s, path, item, meta=meta, store_format=fmt)
            if items[0][1].layer is not None:
                for key, e in sorted(items, key=lambda x: x[1].layer):
                    yield key, iter([e.transform.inverse(t[e.layer].read().result())])
                continue
            (key, e), = items
            shape, dt = want[key]
            if e.transform.name == "linear" and len(shape) == 2:  # JAX [in, out]: torch rows are JAX columns
                yield key, (np.ascontiguousarray(t[:, band].read().result().T)
                            for band in row_blocks(shape[0], shape[1] * dt.itemsize, stream.BLOCK_BYTES))
            elif e.transform.name == "id" and len(shape) == 2 and math.prod(shape) * 4 > stream.BLOCK_BYTES:
                yield key, (t[band].read().result()
                            for band in row_blocks(shape[0], shape[1] * dt.itemsize, stream.BLOCK_BYTES))
            else:
                yield key, iter([e.transform.inverse(t.read().result())])
        for key, role, _ in plan:
            if role == "extra":
                yield key, iter([extras[key]])

    try:
        with ck.atomic_output(out, force) as tmp:
            # 1. pickle + zip records, the tensor bytes left as (sparse) holes
            with FakeTensorMode():
                fake = {k: torch.empty(sh, dtype=torch_dtype(dt.name)) for k, (sh, dt) in want.items()}
            with torch.serialization.skip_data(materialize_fake_tensors=True):
                torch.save({key: fake[detail if role == "alias" else key] for key, role, detail in plan}, tmp)
            del fake
            # 2. where each tensor's bytes go (loading under FakeTensorMode reads no tensor bytes)
            with FakeTensorMode():
                offsets = {k: v.untyped_storage()._checkpoint_offset
                           for k, v in torch.load(tmp, weights_only=True).items() if k in want}
            # 3. the bytes, streamed from the checkpoint
            crcs = {}
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for key, blocks in sources():
                    shape, dt = want[key]
                    nbytes, done, crc = math.prod(shape) * dt.itemsize, 0, 0
                    for a in blocks:
                        a = np.ascontiguousarray(_cast(a, dt.name, key))
                        if a.ndim != len(shape) or a.shape[1:] != shape[1:] or done + a.nbytes > nbytes:
                            raise CheckpointMismatch(f"{key}: exported block {list(a.shape)} does not fit "
                                                     f"{list(shape)}")
                        buf = memoryview(a.reshape(-1).view(np.uint8))
                        _pwrite_all(fd, buf, offsets[key] + done)
                        crc = zlib.crc32(buf, crc)
                        done += a.nbytes
                        bar.bytes(a.nbytes)
                    if done != nbytes:
                        raise CheckpointMismatch(f"{key}: exported {done} bytes != {nbytes} for {list(shape)}")
                    if nbytes:  # an empty record has no data descriptor (and CRC-32 0)
                        crcs[offsets[key]] = crc
                    bar.tensor()
            finally:
                os.close(fd)
            bar.tensor(n_tensors - len(want))  # the aliases
            # 4. CRC-32 of the filled records
            _set_crcs(tmp, crcs)
    finally:
        bar.close()
    return {"tensors": n_tensors, "bytes": total, "layout": src.layout_origin}
