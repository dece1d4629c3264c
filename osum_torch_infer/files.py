"""Files, written and read the same way everywhere (torch- and JAX-free; ``osum_jax`` uses it too).

* :func:`atomic_file`: a file appears complete or not at all (write a temporary sibling, fsync, rename, fsync the
  folder).
* :func:`json_object_line`: one line of a JSONL file -> ``dict``, or :class:`LineError` with the reason a data
  list counts it under (``non-utf8 text``, ``bad json line``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | Path) -> None:
    """Flush a written (and closed) file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (and close); on success its data is fsynced, it replaces
    ``path`` (parents created) and the rename is fsynced, so after a crash ``path`` holds the old file or the
    whole new one; on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class LineError(ValueError):
    """A line that is not a JSON object: ``reason`` (the counted category) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def json_object_line(raw: bytes | str) -> dict:
    """Decode one JSONL line (bytes are UTF-8) into a dict; :class:`LineError` says why not."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise LineError("non-utf8 text", "the line is not UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError("bad json line", f"broken JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LineError("bad json line", "not a JSON object")
    return obj
