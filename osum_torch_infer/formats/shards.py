"""Tar shards in OSUM's ``shard_full_data`` layout: the one reader and writer.

A shard is an uncompressed tar whose members are grouped by key (the member's file name up to its last ``.``):
``KEY.wav`` (or another :data:`~osum_torch_infer.contract.AUDIO_SUFFIXES` member), ``KEY.txt``, ``KEY.task``,
``KEY.lang``, ``KEY.speaker``, ``KEY.emotion``, ``KEY.gender``, ``KEY.duration``, ``KEY.extra`` (JSON; its
``question`` is a chat utterance's prompt), ``KEY.prompt``. A shard list (``shards_list.txt``) names one tar per
line, relative to the list's folder.

:func:`scan_tar` indexes a tar once (member offsets and sizes; the small text members asked for are read): the
training sources read members by offset, and ``osum-infer`` reads an utterance's audio when it decodes it. A
damaged tar keeps the complete utterances before the damage; each problem is one ``[where, reason, detail]``.
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..contract import AUDIO_SUFFIXES
from ..files import atomic_file
from .lists import beside

TEXT_SUFFIXES = ("txt", "task", "lang", "speaker", "emotion", "gender", "duration", "extra", "prompt")
UNREADABLE = "unreadable tar"
MISSING = "missing field"


def read_shard_list(path: str | Path) -> list[str]:
    """The tar paths of a shard list (one per line; relative ones resolved beside the list); ``ValueError`` naming
    the list."""
    path = Path(path)
    try:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the shards list {path}: {e}") from None
    return [beside(path, n) for n in names if n]


def audio_suffix(members: Mapping[str, Any]) -> str | None:
    """The audio member a group is read from (the first of :data:`AUDIO_SUFFIXES` it has)."""
    return next((s for s in AUDIO_SUFFIXES if s in members), None)


def scan_tar(path: str | Path, *, text: Sequence[str] = ("task",),
             require: Sequence[str] = ()) -> tuple[list[dict], list[list[str]]]:
    """Index one tar: ``(records, bad)``.

    A record is ``{"key", "members": {suffix: [data offset, size]}}`` plus the decoded text of each member named
    in ``text`` that it has (``suffix: str``), in file order. ``bad`` holds ``[where, reason, detail]`` for a tar
    that cannot be opened (``where`` = the tar), damage part-way (the groups before it are kept), and per key
    (``where`` = ``tar:key``) a truncated member, a missing ``require``d member or no audio member."""
    path = Path(path)
    groups: dict[str, dict] = {}
    order: list[str] = []
    bad: list[list[str]] = []
    try:
        file_size = path.stat().st_size
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    bad.append([str(path), UNREADABLE, f"damaged after {len(order)} utterances: {e}"])
                    break
                if m is None:
                    break
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                if "." not in name:
                    continue
                key, suffix = name.rsplit(".", 1)
                g = groups.get(key)
                if g is None:
                    g = groups[key] = {"key": key, "members": {}}
                    order.append(key)
                g["members"][suffix.lower()] = [m.offset_data, m.size]
    except (tarfile.TarError, OSError, EOFError) as e:
        return [], [[str(path), UNREADABLE, str(e)]]
    records = []
    with open(path, "rb") as f:
        for key in order:
            g = groups[key]
            members = g["members"]
            where = f"{path}:{key}"
            missing = [s for s in require if s not in members]
            if any(off + size > file_size for off, size in members.values()):
                bad.append([where, UNREADABLE, "member data is truncated"])
            elif missing:
                bad.append([where, MISSING, f"no .{missing[0]} member"])
            elif audio_suffix(members) is None:
                bad.append([where, MISSING, "no audio member"])
            else:
                for suffix in text:
                    if suffix in members:  # small: read while indexing
                        off, size = members[suffix]
                        f.seek(off)
                        g[suffix] = f.read(size).decode("utf-8", errors="replace").strip()
                records.append(g)
    return records, bad


# -- writing ---------------------------------------------------------------------------------------------------------


def utterance_members(key: str, members: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """``[(KEY.suffix, bytes)]`` in the given order: bytes as they are, text as UTF-8, ``extra`` (a dict) as JSON;
    ``None`` values are left out."""
    out = []
    for suffix, value in members.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        if isinstance(value, str):
            value = value.encode("utf-8")
        out.append((f"{key}.{suffix}", bytes(value)))
    return out


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member (its size in bytes, not characters; mtime 0, so equal inputs give equal tars)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


@contextmanager
def write_shard(path: str | Path) -> Iterator[tarfile.TarFile]:
    """An uncompressed tar open for :func:`add_member`, written whole or not at all (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, tarfile.open(tmp, "w") as tf:
        yield tf


def write_shard_list(path: str | Path, tars: Sequence[str | Path]) -> None:
    """``shards_list.txt``: the tars' names relative to the list's folder (the folder can be moved as a whole)."""
    path = Path(path)
    names = [Path(t).name if Path(t).parent == path.parent else str(t) for t in tars]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(n + "\n" for n in names), encoding="utf-8")
