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
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml
from osum_torch_infer.contract import AUDIO_SUFFIXES

log = logging.getLogger("osum_jax.data")

TEXT_SUFFIXES = ("txt", "task", "lang", "speaker", "emotion", "gender", "duration", "extra")
INDEX_VERSION = 3  # 3: blank lines counted


class SampleError(ValueError):
    """A record that cannot be used; ``reason`` is a short category, ``where`` names file and line/member."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"{where}: {reason}{': ' + detail if detail else ''}")


class SkipCounter:
    """Counts skipped records by reason, remembering a few examples of each."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, err: SampleError) -> None:
        self.counts[err.reason] += 1
        if len(self.examples[err.reason]) < 5:
            self.examples[err.reason].append(str(err))

    def merge(self, other: "SkipCounter") -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples[k].extend(v[: max(0, 5 - len(self.examples[k]))])


NONE_LABELS = ("<None>", "<NONE>", "<none>")  # OSUM's filter drops labels containing these ...
NONE_ANSWERS = ("None_in_extract_answer", "None_in_extract_X")  # ... and labels equal to these


def check_record(rec: dict) -> None:
    """The checks of one record that need neither the config nor the audio, shared by training, ``make-shards``
    and ``inspect`` so that a list and its shards hold the same usable utterances. Raises :class:`SampleError`."""
    where, txt = rec["where"], rec.get("txt")
    if not isinstance(txt, str):
        raise SampleError("missing field", where, f"txt is {type(txt).__name__}, not a string")
    if any(t in txt for t in NONE_LABELS) or txt in NONE_ANSWERS:
        raise SampleError("none label", where, repr(txt[:40]))
    if not txt.strip():  # every OSUM task's label has text (a transcript, tags, an answer)
        raise SampleError("empty label", where, f"task {rec.get('task') or '<TRANSCRIBE>'}")
    start, end = rec.get("start"), rec.get("end")
    if start is not None or end is not None:
        try:
            s0, s1 = float(start or 0.0), (None if end is None else float(end))
        except (TypeError, ValueError):
            raise SampleError("bad segment", where, f"start={start!r}, end={end!r} are not numbers") from None
        if s0 < 0 or (s1 is not None and s1 <= s0):
            raise SampleError("bad segment", where, f"start={start!r}, end={end!r}")


# --------------------------------------------------------------------------------------------------------------
# index cache
# --------------------------------------------------------------------------------------------------------------


def _fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_path(path: Path, cache_dir: str) -> Path:
    if cache_dir:
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
        return Path(cache_dir) / f"{path.name}.{digest}.idx.json"
    return path.with_name(path.name + ".idx.json")


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def cached_index(path: Path, cache_dir: str, build) -> dict:
    """Load ``path``'s index from the cache if its fingerprint matches, else build and store it."""
    fp = _fingerprint(path)
    candidates = [_cache_path(path, cache_dir)] if cache_dir else [
        _cache_path(path, ""), _cache_path(path, str(Path.home() / ".cache" / "osum_jax"))]
    for c in candidates:
        try:
            idx = json.loads(c.read_text(encoding="utf-8"))
            if idx.get("version") == INDEX_VERSION and idx.get("fingerprint") == fp:
                return idx
        except (OSError, ValueError):
            continue
    idx = build(path)
    idx.update(version=INDEX_VERSION, fingerprint=fp)
    for c in candidates:
        try:
            _write_json_atomic(c, idx)
            break
        except OSError:  # read-only data directory: fall back to the user cache
            continue
    return idx


# --------------------------------------------------------------------------------------------------------------
# raw data.list
# --------------------------------------------------------------------------------------------------------------


def _index_raw_list(path: Path) -> dict:
    offsets, lengths, lines, tasks, bad, blank = [], [], [], [], [], 0
    with open(path, "rb") as f:
        pos = 0
        for lineno, line in enumerate(f, 1):
            n = len(line)
            stripped = line.strip()
            blank += not stripped
            if stripped:
                reason = None
                try:
                    obj = json.loads(stripped.decode("utf-8"))
                    if not isinstance(obj, dict):
                        reason = "bad json line", "not a JSON object"
                    else:
                        missing = [k for k in ("key", "wav", "txt") if k not in obj]
                        if missing:
                            reason = "missing field", f"no {missing}"
                except UnicodeDecodeError:
                    reason = "non-utf8 text", "line is not UTF-8"
                except json.JSONDecodeError as e:
                    reason = "bad json line", str(e)
                if reason:
                    bad.append([lineno, reason[0], reason[1]])
                else:
                    offsets.append(pos)
                    lengths.append(n)
                    lines.append(lineno)
                    tasks.append(obj.get("task"))
            pos += n
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
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # file changed under us
            raise SampleError("bad json line", where, str(e)) from None
        wav = str(obj["wav"])
        if not os.path.isabs(wav) and not os.path.exists(wav):
            wav = str(self.path.parent / wav)
        rec = {k: obj.get(k) for k in ("key", "txt", "task", "lang", "speaker", "emotion", "gender", "extra")}
        rec.update(audio=wav, start=obj.get("start"), end=obj.get("end"), where=f"{where} (key {obj['key']})")
        return rec

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state


# --------------------------------------------------------------------------------------------------------------
# tar shards
# --------------------------------------------------------------------------------------------------------------


def _index_tar(path: Path) -> dict:
    """Group members by key (name up to the last '.'); keep offsets/sizes and the small task strings.

    A truncated or damaged tar keeps the complete utterances before the damage; the rest is reported.
    """
    groups: dict[str, dict] = {}
    order: list[str] = []
    bad: list[list[str]] = []
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    bad.append([str(path), "unreadable tar", f"damaged after {len(order)} utterances: {e}"])
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
        return {"records": [], "bad": [[str(path), "unreadable tar", str(e)]]}
    records = []
    with open(path, "rb") as f:
        for key in order:
            g = groups[key]
            members = g["members"]
            where = f"{path}:{key}"
            if any(off + size > file_size for off, size in members.values()):
                bad.append([where, "unreadable tar", "member data is truncated"])
            elif "txt" not in members:
                bad.append([where, "missing field", "no .txt member"])
            elif not any(s in members for s in AUDIO_SUFFIXES):
                bad.append([where, "missing field", "no audio member"])
            else:
                if "task" in members:  # tiny; kept in the index for the start-up task check
                    off, size = members["task"]
                    f.seek(off)
                    g["task"] = f.read(size).decode("utf-8", errors="replace").strip()
                records.append(g)
    return {"records": records, "bad": bad}


class TarShardSource:
    """Tar shards (``shard_full_data`` layout) listed one path per line, with random access by record."""

    def __init__(self, shard_list: str | Path | list[str], *, cache_dir: str = "", strict: bool = False,
                 threads: int = 8, progress: bool = False):
        if isinstance(shard_list, (str, Path)):
            self.path = Path(shard_list)
            if not self.path.is_file():
                raise FileNotFoundError(f"shard list {self.path} does not exist")
            lines = [ln.strip() for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            tars = [ln if os.path.isabs(ln) or os.path.exists(ln) else str(self.path.parent / ln) for ln in lines]
        else:
            self.path, tars = None, [str(t) for t in shard_list]
        missing = [t for t in tars if not os.path.isfile(t)]
        self.index_skips = SkipCounter()
        for t in missing:
            err = SampleError("unreadable tar", t, "file does not exist")
            if strict:
                raise err
            self.index_skips.add(err)
            log.warning("skipping %s", err)
        self.tars = [t for t in tars if t not in set(missing)]

        def build(t):
            return cached_index(Path(t), cache_dir, _index_tar)

        with ThreadPoolExecutor(max(1, threads)) as ex:
            it = ex.map(build, self.tars)
            if progress:
                from tqdm import tqdm
                it = tqdm(it, total=len(self.tars), desc="indexing tars", unit="tar")
            indexes = list(it)
        shard_ids, records, tasks = [], [], []
        for sid, idx in enumerate(indexes):
            for where, reason, detail in idx["bad"]:
                err = SampleError(reason, where, detail)
                if strict:
                    raise err
                self.index_skips.add(err)
                log.warning("skipping %s", err)
            for r in idx["records"]:
                shard_ids.append(sid)
                records.append(r)
                tasks.append(r.get("task"))
        self._shard = np.asarray(shard_ids, np.int32)
        self._records = records
        self.tasks = tasks
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._records)

    def _fd(self, sid: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(sid)
        if fd is None:
            fd = self._fds[sid] = os.open(self.tars[sid], os.O_RDONLY)
        return fd

    def __getitem__(self, i: int) -> dict:
        sid, rec = int(self._shard[i]), self._records[i]
        tar = self.tars[sid]
        where = f"{tar}:{rec['key']}"

        def read(suffix: str) -> bytes:
            off, size = rec["members"][suffix]
            data = os.pread(self._fd(sid), size, off)
            if len(data) != size:
                raise SampleError("unreadable tar", where, f"member .{suffix} is truncated")
            return data

        def text(suffix: str) -> str | None:
            if suffix not in rec["members"]:
                return None
            try:
                return read(suffix).decode("utf-8").strip()
            except UnicodeDecodeError:
                raise SampleError("non-utf8 text", where, f".{suffix} is not UTF-8") from None

        audio_suffix = next(s for s in AUDIO_SUFFIXES if s in rec["members"])
        out = {k: text(k) for k in ("txt", "task", "lang", "speaker", "emotion", "gender")}
        extra = text("extra")
        if extra:
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError:
                pass
        out.update(key=rec["key"], audio=read(audio_suffix), extra=extra, start=None, end=None, where=where)
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
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
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line:
                return "raw" if line.startswith("{") else "shard"
    return "raw"


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
