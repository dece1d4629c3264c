"""Data lists: the one reader of their lines.

A data list is a text file with one entry per line: a JSON object (wenet's ``data.list``: ``key``, ``wav``,
``txt``, ``task``, ``start``/``end``, ``extra``, ...), a ``key path`` pair, or (a shard list) one tar path. Each
side reads the fields it needs from the objects :func:`lines` hands out; a line that cannot be read costs that
line only: :meth:`Line.json` raises :class:`~osum_torch_infer.files.LineError` with the reason it is counted
under (``non-utf8 text``, ``bad json line``) and the caller names ``file:line``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..files import LineError, json_object_line


@dataclass(frozen=True)
class Line:
    """One line of a list: its 1-based ``number``, byte ``offset`` and ``raw`` bytes (without the line break)."""

    number: int
    offset: int
    raw: bytes

    @property
    def blank(self) -> bool:
        return not self.raw.strip()

    def text(self) -> str:
        """The line as text (a trailing ``\\r`` dropped); :class:`LineError` ``non-utf8 text``."""
        try:
            return self.raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise LineError("non-utf8 text", "the line is not UTF-8") from None

    def json(self) -> dict:
        """The line as a JSON object; :class:`LineError` says why not."""
        return json_object_line(self.raw)


def lines(path: str | Path) -> Iterator[Line]:
    """Every line of ``path`` (blank ones too: callers count or skip them), read as a stream. ``ValueError``
    naming the file when it cannot be opened."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot read the data list {path}: {e.strerror or e}") from None
    with f:
        offset = 0
        for number, raw in enumerate(f, 1):
            yield Line(number, offset, raw.rstrip(b"\n"))
            offset += len(raw)


def sniff(path: str | Path) -> str:
    """What a list holds, from its first non-blank line: ``jsonl`` (a JSON object), ``tars`` (a path ending in
    ``.tar``), ``lines`` (``key path`` or another path) or ``empty``."""
    for line in lines(path):
        if line.blank:
            continue
        first = line.raw.strip()
        if first.startswith(b"{"):
            return "jsonl"
        return "tars" if first.endswith(b".tar") else "lines"
    return "empty"


def beside(list_path: str | Path, name: str) -> str:
    """A relative path in a list resolves against the list's folder (a copied corpus keeps working); a path that
    exists only relative to the working directory is still taken from there."""
    if os.path.isabs(name):
        return name
    there = Path(list_path).parent / name
    return str(there) if there.exists() or not os.path.exists(name) else name


def parse_extra(extra: Any) -> Any:
    """An entry's ``extra`` (OSUM's free-form JSON: ``question``, ``duration``, ...): a JSON text becomes its
    value; anything else is returned as it is."""
    if isinstance(extra, (bytes, bytearray)):
        extra = extra.decode("utf-8", errors="replace")
    if isinstance(extra, str):
        try:
            return json.loads(extra)
        except json.JSONDecodeError:
            return extra
    return extra
