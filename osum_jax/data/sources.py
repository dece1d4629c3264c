"""Random-access corpus sources in OSUM/wenet formats.

* ``RawListSource``: a ``data.list`` with one JSON object per line (``key``, ``wav``, ``txt``, optional ``task``,
  ``lang``, ``speaker``, ``emotion``, ``gender``, ``start``/``end``, ``extra``).
* ``TarShardSource``: a list of tar paths in the ``shard_full_data`` layout (``{key}.wav|flac|...``,
  ``{key}.txt``, ``{key}.task``, ... grouped by key).
* ``MixedSource``: OSUM's data-config YAML ``{name: {path, weight}}`` (integer weight = repeat, fraction =
  a fixed random subset), here at utterance granularity.

Every source has an index (line offsets, or tar member offsets) built once and cached as JSON next to the
data (or in ``cache_dir``), so Grain can read any record by number: global shuffling and exact resume, no
streaming. Problems found while indexing (bad JSON, missing fields, groups without audio) are skipped,
counted by reason and reported with file and line/member; ``strict`` raises instead.

The tar reader is :mod:`osum_jax.data.shards`; the skip reasons, line-level checks and index cache that every
source shares are :mod:`osum_jax.data.records`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import yaml

from osum_torch_infer.files import LineError, json_object_line
from osum_torch_infer.formats.lists import beside, sniff
from osum_torch_infer.formats.lists import lines as list_lines

from .records import SampleError, SkipCounter, cached_index
from .shards import TarShardSource

log = logging.getLogger("osum_jax.data")


# --------------------------------------------------------------------------------------------------------------
# raw data.list
# --------------------------------------------------------------------------------------------------------------


def _index_raw_list(path: Path) -> dict:
    offsets, lengths, lines, tasks, bad, blank = [], [], [], [], [], 0
    for line in list_lines(path):  # the one data-list reader (osum_torch_infer.formats.lists)
        if line.blank:
            blank += 1
            continue
        try:
            obj = line.json()
        except LineError as e:
            bad.append([line.number, e.reason, e.detail])
            continue
        missing = [k for k in ("key", "wav", "txt") if k not in obj]
        if missing:
            bad.append([line.number, "missing field", f"no {missing}"])
            continue
        offsets.append(line.offset)
        lengths.append(len(line.raw))
        lines.append(line.number)
        tasks.append(obj.get("task"))
    return {"offsets": offsets, "lengths": lengths, "lines": lines, "tasks": tasks, "bad": bad, "blank": blank}


class RawListSource:
    """A wenet raw ``data.list`` (jsonl) with random access by record number."""

    def __init__(self, path: str | Path, *, cache_dir: str = "", strict: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data list {self.path} does not exist")
        idx = cached_index(self.path, cache_dir, _index_raw_list)
        self._offsets = np.asarray(idx["offsets"], np.int64)
        self._lengths = np.asarray(idx["lengths"], np.int64)
        self._lines = np.asarray(idx["lines"], np.int64)
        self.tasks = idx["tasks"]
        self.index_skips = SkipCounter()
        self.bad_lines = [(int(n), r, d) for n, r, d in idx["bad"]]  # (line, reason, detail), in file order
        if idx.get("blank"):  # counted, never warned about or refused
            self.index_skips.counts["blank line"] += int(idx["blank"])
        for lineno, reason, detail in idx["bad"]:
            err = SampleError(reason, f"{self.path}:{lineno}", detail)
            if strict:
                raise err
            self.index_skips.add(err)
            log.warning("skipping %s", err)
        self._fd: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return os.pread(self._fd[1], length, offset)

    def where_of(self, i: int) -> str:
        return f"{self.path}:{self.line_of(i)}"

    def line_of(self, i: int) -> int:
        """The 1-based line number of record ``i`` in the list file."""
        return int(self._lines[i])

    def __getitem__(self, i: int) -> dict:
        raw = self._read(int(self._offsets[i]), int(self._lengths[i]))
        where = f"{self.path}:{self.line_of(i)}"
        try:
            obj = json_object_line(raw)
        except LineError as e:  # file changed under us
            raise SampleError(e.reason, where, e.detail) from None
        wav = beside(self.path, str(obj["wav"]))
        rec = {k: obj.get(k) for k in ("key", "txt", "task", "lang", "speaker", "emotion", "gender", "extra")}
        rec.update(audio=wav, start=obj.get("start"), end=obj.get("end"), where=f"{where} (key {obj['key']})")
        return rec

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state


# --------------------------------------------------------------------------------------------------------------
# format detection and mixing
# --------------------------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``mix`` for a YAML data config, ``shard`` for a list of tar paths, else ``raw`` (jsonl)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data list {p} does not exist")
    if p.suffix in (".yaml", ".yml"):
        return "mix"
    return "raw" if sniff(p) in ("jsonl", "empty") else "shard"


def open_source(path: str | Path, fmt: str = "auto", *, cache_dir: str = "", strict: bool = False,
                progress: bool = False):
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "raw":
        return RawListSource(path, cache_dir=cache_dir, strict=strict)
    if fmt == "shard":
        return TarShardSource(path, cache_dir=cache_dir, strict=strict, progress=progress)
    if fmt == "mix":
        return MixedSource(path, cache_dir=cache_dir, strict=strict, progress=progress)
    raise ValueError(f"unknown data format {fmt!r}")


class MixedSource:
    """OSUM's weighted data config: ``{name: {path: list, weight: w}}``.

    Integer weights repeat a corpus ``w`` times; a fractional weight keeps a fixed random subset of
    ``floor(len * w)`` utterances (seed 7890, OSUM's). Weight 0 drops the corpus.
    """

    def __init__(self, config: str | Path, *, cache_dir: str = "", strict: bool = False, progress: bool = False):
        self.path = Path(config)
        try:
            spec = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read data config {self.path}: {e}") from None
        if not isinstance(spec, dict) or not spec:
            raise ValueError(f"{self.path}: expected a mapping {{name: {{path, weight}}}}")
        self.sources, pairs = [], []
        self.names = []
        for name, entry in spec.items():
            if not isinstance(entry, dict) or "path" not in entry:
                raise ValueError(f"{self.path}: entry {name!r} needs a 'path'")
            try:
                weight = float(entry.get("weight", 1))
            except (TypeError, ValueError):
                raise ValueError(f"{self.path}: entry {name!r} has a non-numeric weight {entry.get('weight')!r}")
            if weight < 0:
                raise ValueError(f"{self.path}: entry {name!r} has a negative weight")
            sub_path = Path(entry["path"])
            if not sub_path.is_absolute() and not sub_path.exists():
                sub_path = self.path.parent / sub_path
            src = open_source(sub_path, entry.get("format", "auto"), cache_dir=cache_dir, strict=strict,
                              progress=progress)
            sid = len(self.sources)
            self.sources.append(src)
            self.names.append(name)
            n = len(src)
            if weight >= 1:
                idx = np.tile(np.arange(n), int(weight))
            else:
                rng = np.random.default_rng(7890)
                idx = np.sort(rng.permutation(n)[: int(math.floor(n * weight))])
            pairs.append(np.stack([np.full(len(idx), sid), idx], axis=1))
        self._pairs = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
        self.index_skips = SkipCounter()
        for s in self.sources:
            self.index_skips.merge(s.index_skips)
        self.tasks = [self.sources[s].tasks[j] for s, j in self._pairs]

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        s, j = self._pairs[i]
        return self.sources[int(s)][int(j)]


def corpus_tasks(source) -> Iterable[str | None]:
    return source.tasks
