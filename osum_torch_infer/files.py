"""Files, written and read the same way everywhere (torch- and JAX-free; ``osum_jax`` uses it too).

* :func:`atomic_file`: a file (or a directory) appears complete or not at all (write a temporary sibling, fsync,
  rename, fsync the folder). The one atomic write: ``osum_jax``'s checkpoints and packages use it too.
* :func:`json_object_line`: one line of a JSONL file -> ``dict``, or :class:`LineError` with the reason a data
  list counts it under (``non-utf8 text``, ``bad json line``).
"""

from __future__ import annotations

import json
import os
import shutil
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


def fsync_tree(path: str | Path) -> None:
    """:func:`fsync_path` a file, or every file and folder under a directory (then the directory itself)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        fsync_path(path)
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                fsync_path(p)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(path)


def remove_path(path: str | Path) -> None:
    """Remove a file, link or directory tree if it is there."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (and close) as a file or fill as a directory; on success its
    data is fsynced (every file of a directory), it replaces ``path`` (parents created; an existing directory is
    swapped out and removed) and the rename is fsynced, so after a crash ``path`` holds the old content or the
    whole new one; on any error the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():  # os.replace cannot replace a non-empty one
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            remove_path(old)
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            remove_path(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        remove_path(tmp)


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
