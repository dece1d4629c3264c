"""What every corpus source shares: unusable records and their reasons, the line-level checks, the index cache.

A source (:mod:`osum_jax.data.sources`, :mod:`osum_jax.data.shards`) raises or counts :class:`SampleError` for a
record it cannot use; :func:`check_record` holds the checks that need neither the config nor the audio; an index
(line offsets, or tar member offsets) is built once per file and cached as JSON by :func:`cached_index`.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Any

from osum_torch_infer.files import atomic_file

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
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)


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
