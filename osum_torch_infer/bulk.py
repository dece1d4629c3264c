"""Resumable, shardable results files for ``osum-infer`` (torch-free).

A run appends each finished utterance to its results file as one line (``jsonl``: the result as JSON; ``text``:
OSUM's ``key<TAB>text``), flushed at once and fsynced every few seconds (:class:`Journal`). A run that is killed
leaves complete lines, and at most one torn last line (a write cut short). ``--resume`` reads the file
(:func:`read_records`), drops a torn last line (saying so, with the file and line) and decodes only the keys that
are not there yet. ``--shard I/N`` (:func:`parse_shard`) keeps every N-th utterance, starting at the I-th (0-based),
so that N processes or hosts split a list; :func:`merge` joins their files in the list's order, checking that
every key is there exactly once. Lines are copied byte for byte, so a merged file does not depend on how the run
was split or interrupted.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import LineError, atomic_file, fsync_dir, json_object_line

try:  # advisory lock on a results file being written (POSIX); elsewhere no lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_ONE_LINE = re.compile(r"[\t\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
FSYNC_SECONDS = 10.0  # a results file is fsynced at most this long after a line is written (and when closed)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; ``ValueError`` naming the flag otherwise."""
    m = _SHARD.fullmatch(text or "")
    if m is None or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise ValueError(f"--shard {text!r}: expected I/N, 0 <= I < N (shard I of N, counted from 0), e.g. 0/4")
    return int(m[1]), int(m[2])


def take_shard(items: Sequence[Any], index: int, count: int) -> list:
    """Every ``count``-th item, starting at ``index``: shard ``index`` of ``count``."""
    return list(items[index::count])


def record_line(result: Mapping[str, Any], fmt: str = "jsonl") -> bytes | None:
    """One result as the bytes of its line (``None``: a failed file in the ``text`` format, which has no place for
    errors). ``text``: line breaks and tabs inside the text become spaces, so that every result stays one line."""
    if fmt == "jsonl":
        return (json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8")
    if "error" in result:
        return None
    return f"{result['key']}\t{_ONE_LINE.sub(' ', result['text'])}\n".encode("utf-8")


@dataclass
class Records:
    """What a results file holds: its complete lines by key, and what is wrong with it."""

    path: Path
    fmt: str  # "jsonl" or "text"
    lines: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # key -> (line number, the line's bytes)
    errors: int = 0  # records of files that failed (jsonl)
    repeated: list[tuple[str, int, int]] = field(default_factory=list)  # (key, first line, repeated line)
    torn: tuple[int, int] | None = None  # (line number, bytes) of a last line without its line break
    size: int = 0  # bytes up to the end of the last complete line

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key][0]}"


def sniff_format(data: bytes) -> str | None:
    """``jsonl`` or ``text`` from a results file's first line; ``None`` for an empty file."""
    first = next((ln for ln in data.split(b"\n") if ln.strip()), None)
    if first is None:
        return None
    return "jsonl" if first.lstrip().startswith(b"{") else "text"


def read_records(path: str | Path, fmt: str | None = None) -> Records:
    """Read a results file written by ``osum-infer`` (``fmt``: expected format; ``None``: as it looks).

    A last line without its line break is a torn write (``Records.torn``); any other line that cannot be read, or
    a file in the other format, is a ``ValueError`` naming the file and line. Keys found twice are listed in
    ``Records.repeated`` (the first occurrence is kept)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    body, sep, tail = data.rpartition(b"\n")
    complete = body + sep
    raw_lines = complete.split(b"\n")[:-1] if complete else []
    found = sniff_format(complete) or fmt or "jsonl"
    if fmt is not None and found != fmt:
        raise ValueError(f"{path} holds {found} results, not {fmt}: pass --format {found}")
    rec = Records(path, found, size=len(complete))
    if tail:
        rec.torn = (len(raw_lines) + 1, len(tail))
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        if found == "jsonl":
            try:
                d = json_object_line(raw)
            except LineError as e:
                raise ValueError(f"{path}:{n}: {e.detail}; not a line osum-infer writes") from None
            key = d.get("key")
            if not isinstance(key, str):
                raise ValueError(f"{path}:{n}: no string 'key' field; not a line osum-infer writes")
            error = "error" in d
        else:
            try:
                key, tab, _ = raw.decode("utf-8").partition("\t")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: the line is not UTF-8; not a line osum-infer writes") from None
            if not tab:
                raise ValueError(f"{path}:{n}: no tab after the key; not a key<TAB>text line")
            error = False
        if key in rec.lines:
            rec.repeated.append((key, rec.lines[key][0], n))
            continue
        rec.lines[key] = (n, raw + b"\n")
        rec.errors += error
    return rec


def resume_plan(out: str | Path, items: Sequence[Any], fmt: str, source: str) -> tuple[list, Records]:
    """The items of this run whose keys are not in ``out`` yet, and what ``out`` holds. ``ValueError`` when ``out``
    holds a key twice, or a key this run does not have (``source`` says what this run's input is: another list or
    shard than the interrupted run's)."""
    rec = read_records(out, fmt)
    if rec.repeated:
        key, first, again = rec.repeated[0]
        raise ValueError(f"{out}:{again}: key {key!r} is already at line {first}; a results file holds each key "
                         f"once")
    wanted = {it.key for it in items}
    for key, (n, _) in rec.lines.items():
        if key not in wanted:
            raise ValueError(f"{out}:{n}: key {key!r} is not in this run's input ({source}); is this the --out, "
                             f"--data and --shard of the interrupted run?")
    return [it for it in items if it.key not in rec.lines], rec


class Journal:
    """A results file that grows by whole lines: each :meth:`write` is flushed to the OS at once (a killed process
    loses nothing written), the file is fsynced every ``fsync_seconds`` and on :meth:`close` (a power cut loses
    at most that much). An advisory lock keeps a second process from writing the same file.

    ``keep``: bytes of the existing file to keep (its complete lines; a torn last line beyond is cut off);
    ``None`` keeps everything; ``0`` starts it empty (``--overwrite``)."""

    def __init__(self, path: str | Path, *, keep: int | None = None, fsync_seconds: float = FSYNC_SECONDS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")
        if fcntl is not None:
            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.close()
                raise ValueError(f"{self.path} is being written by another process (osum-infer with the same "
                                 f"--out?)") from None
        if keep is not None and keep != os.fstat(self._f.fileno()).st_size:
            self._f.truncate(keep)
        self.fsync_seconds = fsync_seconds
        self._sync()
        fsync_dir(self.path.parent)  # a new file's entry

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def write(self, line: bytes) -> None:
        self._f.write(line)
        self._f.flush()
        if time.monotonic() - self._synced >= self.fsync_seconds:
            os.fsync(self._f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._sync()
            finally:
                self._f.close()  # releases the lock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MergeError(ValueError):
    """Shard files that do not add up to the list: ``problems`` names each key and file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s): " + "; ".join(problems[:3]))


def merge(out: str | Path, shards: Sequence[str | Path], items: Sequence[Any], *, source: str,
          fmt: str = "jsonl") -> tuple[int, int]:
    """Join jsonl results files (the shards of one list, in any order) into ``out`` in the order of ``items``,
    each line copied byte for byte (``fmt="text"``: as ``key<TAB>text``, failed files left out). Every key of the
    list must be in exactly one shard, and every shard key in the list; otherwise :class:`MergeError` lists each
    problem with its key and file, and nothing is written. ``out`` is written to a temporary sibling and renamed
    into place. Returns ``(results, failed)``."""
    problems: list[str] = []
    found: dict[str, tuple[Records, int, bytes]] = {}
    for shard in shards:
        rec = read_records(shard)
        if rec.fmt != "jsonl":
            raise ValueError(f"{shard} holds text results; merge needs jsonl shards (text results leave out the "
                             f"files that failed, so a missing key could not be told from a failed one)")
        if rec.torn is not None:
            problems.append(f"{shard}:{rec.torn[0]}: a torn last line: this shard was interrupted; finish it with "
                            f"osum-infer --resume")
        for key, first, again in rec.repeated:
            problems.append(f"key {key!r} is twice in {shard} (lines {first} and {again})")
        for key, (n, raw) in rec.lines.items():
            if key in found:
                problems.append(f"key {key!r} is in {found[key][0].path}:{found[key][1]} and in {shard}:{n}")
            else:
                found[key] = (rec, n, raw)
    wanted = {it.key for it in items}
    for key, (rec, n, _) in found.items():
        if key not in wanted:
            problems.append(f"{rec.path}:{n}: key {key!r} is not in {source}")
    for it in items:
        if it.key not in found:
            problems.append(f"key {it.key!r} ({it.where or it.wav}) is in no shard")
    if problems:
        raise MergeError(problems)
    ok = failed = 0
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        for it in items:
            rec, n, raw = found[it.key]
            error = rec.fmt == "jsonl" and "error" in json.loads(raw)
            ok, failed = ok + (not error), failed + error
            line = raw if fmt == "jsonl" else record_line(json.loads(raw), fmt)
            if line is not None:
                f.write(line)
    return ok, failed
