"""``TarShardSource``: tar shards in OSUM's ``shard_full_data`` layout, with random access by record.

A shard list names one tar path per line; each tar holds ``{key}.wav|flac|...``, ``{key}.txt``, ``{key}.task``, ...
grouped by key. Each tar's member offsets are indexed once and cached (:func:`~osum_jax.data.records.cached_index`).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from osum_torch_infer.contract import AUDIO_SUFFIXES

from .records import SampleError, SkipCounter, beside, cached_index

log = logging.getLogger("osum_jax.data")

TEXT_SUFFIXES = ("txt", "task", "lang", "speaker", "emotion", "gender", "duration", "extra")


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
            tars = [beside(self.path, ln) for ln in lines]
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
