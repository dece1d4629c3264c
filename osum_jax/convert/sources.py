"""Reading torch checkpoints tensor by tensor without loading them: ``.pt`` (mmap) and safetensors.

Both readers expose the same small interface, :class:`TensorSource`: the key list with shapes and dtypes (read
from headers only) and ``numpy(key, rows=None)``, which returns a zero-copy numpy view of one tensor (or a block
of its rows) in the stored dtype. bfloat16 is returned as ``ml_dtypes.bfloat16``, so no value is ever rounded.

Memory: a ``.pt`` is opened with ``torch.load(path, weights_only=True, mmap=True)``; pages of the mapped file
that were read become part of the process RSS until the kernel reclaims them, so :meth:`TensorSource.release`
drops them (``madvise(MADV_DONTNEED)``; the mapping is private and read-only, nothing is lost) once a tensor
has been converted. That keeps the peak RSS of a full-size conversion near the size of one layer.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import zipfile
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np


class SourceError(ValueError):
    """An input file is missing, truncated or not the expected format (message names the file)."""


# torch dtype name <-> numpy dtype. Only the float/int types that appear in model checkpoints.
_NP_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(bool),
}


def np_dtype(name: str) -> np.dtype:
    try:
        return _NP_DTYPES[name]
    except KeyError:
        raise SourceError(f"unsupported dtype {name!r}; known: {sorted(_NP_DTYPES)}") from None


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` / ``np.dtype('float32')`` / ``ml_dtypes.bfloat16`` -> ``'bfloat16'`` / ``'float32'``."""
    s = str(dtype)
    return s.split(".", 1)[1] if s.startswith("torch.") else np.dtype(dtype).name


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def torch_to_numpy(t) -> np.ndarray:
    """Zero-copy numpy view of a CPU torch tensor in its own dtype (bfloat16 via ``ml_dtypes``)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray):
    """Zero-copy torch tensor of a numpy array (bfloat16 via an int16 view)."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_libc = None


def _madvise_dontneed(address: int, nbytes: int) -> None:
    """Drop the pages of ``[address, address + nbytes)`` from this process (page-aligned inwards)."""
    global _libc
    if nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    start = (address + page - 1) // page * page
    end = (address + nbytes) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


class TensorSource:
    """A read-only collection of named tensors: ``keys``, ``shape(key)``, ``dtype(key)``, ``numpy(key)``."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def numpy(self, key: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or ``tensor[rows]``) as a numpy view in its stored dtype."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Hint that ``key`` has been consumed (lets the mmap reader drop its pages)."""

    def same_storage(self, a: str, b: str) -> bool:
        return False

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key), dtype=np.int64)) * np_dtype(self.dtype(key)).itemsize

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchPtSource(TensorSource):
    """A flat ``state_dict`` saved with ``torch.save`` (OSUM's ``infer.pt``), memory-mapped."""

    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        if not zipfile.is_zipfile(self.path):
            raise SourceError(
                f"{self.path}: not a torch zip checkpoint (truncated, corrupt, or saved with the legacy "
                f"non-zip format; re-save it with torch.save on torch >= 1.6)")
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError depending on the damage
            raise SourceError(f"{self.path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
            raise SourceError(f"{self.path}: this is a DeepSpeed model-states file; convert it to a flat state "
                              f"dict first (torch.save(torch.load(f, weights_only=True)['module'], 'infer.pt'))")
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise SourceError(f"{self.path}: expected a flat state dict {{name: tensor}}, got {type(obj).__name__}")
        self._state = obj
        self._check_storages()

    def _check_storages(self) -> None:
        """A truncated data record inside an intact zip would map fewer bytes than the tensors need."""
        for k, t in self._state.items():
            if t.numel() == 0:
                continue
            last = t.storage_offset() + sum((n - 1) * step for n, step in zip(t.shape, t.stride()))
            need = (last + 1) * t.element_size()
            have = t.untyped_storage().nbytes()
            if have < need:
                raise SourceError(f"{self.path}: tensor {k!r} needs {need} bytes but its storage holds {have} "
                                  f"(file truncated or corrupt)")

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> str:
        return dtype_name(self._state[key].dtype)

    def tensor(self, key: str):
        return self._state[key]

    def numpy(self, key: str, rows: slice | None = None) -> np.ndarray:
        t = self._state[key]
        if rows is not None:
            t = t[rows]
        return torch_to_numpy(t.contiguous() if not t.is_contiguous() else t)

    def release(self, key: str) -> None:
        t = self._state[key]
        if t.numel():
            _madvise_dontneed(t.data_ptr(), t.numel() * t.element_size())

    def same_storage(self, a: str, b: str) -> bool:
        ta, tb = self._state[a], self._state[b]
        return (ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
                and ta.storage_offset() == tb.storage_offset() and ta.shape == tb.shape
                and ta.stride() == tb.stride())

    def close(self) -> None:
        self._state = {}


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def _safe_open_check(f: Path) -> None:
    """Open ``f`` with ``safetensors.safe_open`` (header validation only; no tensor is read)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is in the train extra; the checks above are its own
        return
    try:
        with safe_open(str(f), framework="numpy"):
            pass
    except Exception as e:  # noqa: BLE001 - SafetensorError (a Rust error) or OSError: say what safetensors said
        raise SourceError(f"{f}: safetensors refuses it ({str(e).splitlines()[0][:200]})") from None


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsSource(TensorSource):
    """A Hugging Face checkpoint directory: ``model.safetensors``, or shards listed by ``*.safetensors.index.json``.

    Headers are parsed directly (8-byte length + JSON), data is read with ``numpy.memmap`` per tensor, so a
    shard is never loaded whole and bfloat16 needs no torch.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = self._files(self.path)
        self._where: dict[str, tuple[Path, int, tuple[int, ...], str]] = {}
        for f in files:
            for key, (offset, shape, dtype) in self._header(f).items():
                if key in self._where:
                    raise SourceError(f"{f}: tensor {key!r} also appears in {self._where[key][0]}")
                self._where[key] = (f, offset, shape, dtype)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise SourceError(f"{path}: no such file or directory")
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise SourceError(f"{path}: several safetensors indexes {[p.name for p in indexes]}")
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise SourceError(f"{indexes[0]}: not a safetensors index ({e})") from None
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise SourceError(f"{indexes[0]} lists shard(s) that do not exist: {missing}")
            return files
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{path}: no *.safetensors files (only safetensors checkpoints are read; "
                              f"re-save with save_pretrained(safe_serialization=True))")
        return files

    @staticmethod
    def _header(f: Path) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """``{key: (file offset, shape, dtype)}``, after checking exactly what ``safetensors.safe_open`` checks: a
        header of at most 100 MB of UTF-8 JSON, an object of tensor entries (``dtype``, ``shape``,
        ``data_offsets`` of non-negative integers) and an optional string-to-string ``__metadata__``; each
        tensor's byte count matching its shape and dtype; offsets, sorted, contiguous from 0 (no overlap, no gap)
        and ending exactly at the end of the file. Then ``safe_open`` itself opens the file, so nothing it refuses
        gets through. Every refusal is a one-line :class:`SourceError` naming the file."""
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SourceError(f"{f}: truncated safetensors file (no header)")
            n = int.from_bytes(raw, "little")
            if n > MAX_HEADER_BYTES:
                raise SourceError(f"{f}: safetensors header of {n} bytes > the format's limit of {MAX_HEADER_BYTES}")
            if n <= 0 or 8 + n > size:
                raise SourceError(f"{f}: truncated or corrupt safetensors header (length {n}, file {size} bytes)")
            text = fh.read(n)
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise SourceError(f"{f}: corrupt safetensors header ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(header, dict):
            raise SourceError(f"{f}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise SourceError(f"{f}: corrupt safetensors header (__metadata__ must map names to strings)")

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        spans = []
        for key, info in header.items():
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                raise SourceError(f"{f}: corrupt safetensors header (tensor {key!r} needs dtype, shape and "
                                  f"data_offsets)")
            shape, offsets = info["shape"], info["data_offsets"]
            if not isinstance(shape, list) or not all(count(d) for d in shape):
                raise SourceError(f"{f}: corrupt safetensors header (tensor {key!r}: shape {shape!r} is not a "
                                  f"list of non-negative integers)")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(count(o) for o in offsets):
                raise SourceError(f"{f}: corrupt safetensors header (tensor {key!r}: data_offsets {offsets!r} "
                                  f"are not two non-negative integers)")
            dt = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
            if dt is None:
                raise SourceError(f"{f}: tensor {key!r} has unsupported dtype {info['dtype']!r}")
            begin, end = offsets
            shape = tuple(shape)
            want = int(np.prod(shape, dtype=np.int64)) * np_dtype(dt).itemsize
            if end < begin or end - begin != want:
                raise SourceError(f"{f}: tensor {key!r} has {end - begin} bytes, shape {shape} {dt} needs {want}")
            spans.append((begin, end, key, shape, dt))
        base = 8 + n
        out, pos = {}, 0
        for begin, end, key, shape, dt in sorted(spans):
            if begin != pos:
                what = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes"
                raise SourceError(f"{f}: tensor {key!r} at data bytes [{begin}, {end}) {what} (safetensors "
                                  f"offsets must be contiguous)")
            if base + end > size:
                raise SourceError(f"{f}: truncated: tensor {key!r} ends at byte {base + end}, file has {size}")
            out[key] = (base + begin, shape, dt)
            pos = end
        if base + pos != size:
            raise SourceError(f"{f}: {size - base - pos} bytes after the last tensor (safetensors data must end "
                              f"with the file)")
        _safe_open_check(f)
        return out

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][2]

    def dtype(self, key: str) -> str:
        return self._where[key][3]

    def numpy(self, key: str, rows: slice | None = None) -> np.ndarray:
        f, offset, shape, dt = self._where[key]
        a = np.memmap(f, dtype=np_dtype(dt), mode="r", offset=offset, shape=shape) if shape else \
            np.fromfile(f, dtype=np_dtype(dt), count=1, offset=offset).reshape(())
        return np.asarray(a[rows] if rows is not None else a)


def row_blocks(n_rows: int, row_bytes: int, max_bytes: int = 256 << 20) -> Iterator[slice]:
    """Split ``n_rows`` into consecutive slices of at most ``max_bytes`` each (at least one row)."""
    step = max(1, max_bytes // max(row_bytes, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def file_size(path: str | Path) -> int:
    return os.stat(path).st_size
