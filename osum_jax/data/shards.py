"""``TarShardSource``: tar shards in OSUM's ``shard_full_data`` layout, with random access by record.

A shard list names one tar path per line; each tar holds ``{key}.wav|flac|...``, ``{key}.txt``, ``{key}.task``, ...
grouped by key. The format is read by :mod:`osum_torch_infer.formats.shards` (``osum-infer`` reads shards with it
too); each tar's member offsets are indexed once and cached (:func:`~osum_jax.data.records.cached_index`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from osum_torch_infer.formats.lists import parse_extra
from osum_torch_infer.formats.shards import audio_suffix, read_shard_list, scan_tar
from osum_torch_infer.progress import progress_bar

from .records import SampleError, SkipCounter, cached_index

log = logging.getLogger("osum_jax.data")

def _index_tar(path: Path) -> dict:
    """The tar's records (key, member offsets, the small ``.task``) and problems: :func:`osum_torch_infer.formats.
    shards.scan_tar`, which keeps the complete utterances before any damage."""
    records, bad = scan_tar(path, text=("task",), require=("txt",))
    return {"records": records, "bad": bad}


class TarShardSource:
    """Tar shards (``shard_full_data`` layout) listed one path per line, with random access by record."""

    def __init__(self, shard_list: str | Path | list[str], *, cache_dir: str = "", strict: bool = False,
                 threads: int = 8, progress: bool = False):
        if isinstance(shard_list, (str, Path)):
            self.path = Path(shard_list)
            if not self.path.is_file():
                raise FileNotFoundError(f"shard list {self.path} does not exist")
            tars = read_shard_list(self.path)
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
            indexes = list(progress_bar(ex.map(build, self.tars), total=len(self.tars), desc="indexing tars",
                                        unit="tar", enabled=progress))
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

        out = {k: text(k) for k in ("txt", "task", "lang", "speaker", "emotion", "gender")}
        extra = text("extra")
        out.update(key=rec["key"], audio=read(audio_suffix(rec["members"])),
                   extra=parse_extra(extra) if extra else extra, start=None, end=None, where=where)
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state
