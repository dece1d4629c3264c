"""From audio files to parsed results: decode, log-mel, 30 s windows, batched generation, task-aware fields."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .bulk import record_line
from .files import LineError, atomic_file
from .formats.lists import lines, parse_extra, sniff
from .formats.shards import UNREADABLE, audio_suffix, read_shard_list, scan_tar
from .features import AudioError, MAX_SECONDS, SAMPLE_RATE, load_audio, log_mel_spectrogram, wav_truncation
from .parsing import normalize_task
from .progress import progress_bar
from .segment import OVERLAP_SECONDS, join_segments, segment_audio

@dataclass
class Item:
    key: str
    wav: str
    task: str | None = None
    start: float | None = None
    end: float | None = None
    where: str = ""  # file:line of a data-list entry, tar:member of a shard
    error: str | None = None  # a line that cannot be used: it becomes an error record, the others go on
    prompt: str | None = None  # this utterance's own prompt (``prompt``; OSUM's ``extra.question`` for chat)
    audio: bytes | None = None  # the audio itself, in memory (``wav`` then only names it)
    member: tuple[str, int, int] | None = None  # a tar shard's audio member: (tar path, data offset, size)


def utterance_prompt(prompt: Any, extra: Any) -> str | None:
    """An utterance's own prompt: its ``prompt`` field, else OSUM's ``extra["question"]`` (as OSUM's recognizer
    uses it), else None (the task's prompt from the package)."""
    extra = parse_extra(extra)
    for p in (prompt, extra.get("question") if isinstance(extra, dict) else None):
        if isinstance(p, str) and p.strip():
            return p
    return None


def read_shards(path: str | Path, *, strict: bool = False) -> list[Item]:
    """OSUM's ``shard_full_data`` tars (:mod:`osum_torch_infer.formats.shards`): a ``shards_list.txt`` (one tar path
    per line, relative to the list) or one ``.tar``. Members ``KEY.wav`` (or another audio suffix), ``KEY.task``,
    ``KEY.extra`` (JSON; its ``question`` is the prompt of chat utterances), ``KEY.prompt``. Only the small text
    members are read here; an utterance's audio is read from its tar when it is decoded (``Item.member``: tar,
    offset, size). A tar that cannot be read, a damaged part of one, or a key without audio becomes an error item
    (``strict``: ``ValueError``); the complete utterances before damage are kept."""
    path = Path(path)
    tars = [str(path)] if path.suffix == ".tar" else read_shard_list(path)
    items: list[Item] = []
    for tar in tars:
        records, bad = scan_tar(tar, text=("task", "prompt", "extra"))
        for rec in records:
            off, size = rec["members"][audio_suffix(rec["members"])]
            where = f"{tar}:{rec['key']}"
            items.append(Item(rec["key"], where, rec.get("task"), where=where, member=(str(tar), off, size),
                              prompt=utterance_prompt(rec.get("prompt"), rec.get("extra"))))
        for where, reason, detail in bad:
            error = f"{where}: {reason} ({detail})" if reason == UNREADABLE else f"{where}: {detail}"
            if strict:
                raise ValueError(error)
            items.append(Item(where, where, where=where, error=error))
    return items


def read_any(path: str | Path, *, strict: bool = False) -> list[Item]:
    """Tar shards (a ``.tar`` or a list of tar paths) or a data list (jsonl / ``key path``)."""
    path = Path(path)
    if path.suffix == ".tar" or sniff(path) == "tars":
        return read_shards(path, strict=strict)
    return read_list(path, strict=strict)


def read_list(path: str | Path, *, strict: bool = False) -> list[Item]:
    """A data list (:func:`osum_torch_infer.formats.lists.lines`): jsonl (``key``, ``wav``, optional ``task``,
    ``start``, ``end``, ``prompt``, ``extra``) or ``key<space>path`` lines.

    A line that cannot be read (not UTF-8, broken JSON, no ``wav``, no ``key path``) becomes an :class:`Item`
    with ``error`` naming ``file:line`` (its result is an error record; the run goes on); ``strict`` raises
    ``ValueError`` at the first one instead."""
    items = []
    path = Path(path)
    for ln in lines(path):
        if ln.blank:
            continue
        where = f"{path}:{ln.number}"
        item = error = None
        try:
            line = ln.text()
            if line.lstrip().startswith("{"):
                d = ln.json()
                wav = str(d["wav"])
                key = str(d.get("key", Path(wav).stem))
                wav = wav if Path(wav).is_absolute() else str(path.parent / wav)
                item = Item(key, wav, d.get("task"), d.get("start"), d.get("end"), where=where,
                            prompt=utterance_prompt(d.get("prompt"), d.get("extra")))
            else:
                parts = line.split(None, 1)
                if len(parts) != 2:
                    error = f"expected 'key path' or a JSON object, got {line[:80]!r}"
                else:
                    wav = parts[1].strip()
                    wav = wav if Path(wav).is_absolute() else str(path.parent / wav)
                    item = Item(parts[0], wav, where=where)
        except LineError as e:
            error = e.detail
        except KeyError as e:
            error = f"no {e} field"
        except (TypeError, AttributeError):  # a field of the wrong type
            error = "not a JSON object with a string 'wav'"
        if error is not None:
            if strict:
                raise ValueError(f"{where}: {error}")
            item = Item(where, "", where=where, error=f"{where}: {error}")
        items.append(item)
    return items


@dataclass
class _Unit:
    item: int
    offset: float
    feats: np.ndarray
    prompt_ids: list[int]
    end: float = 0.0  # the segment's end (seconds)
    cut_in_speech: bool = False  # the segment ends mid-speech: the next one overlaps it


def _located(item: Item, message: str) -> str:
    """An item's error naming where it came from: ``list:line (key k): ...`` for a data list line (errors found
    while reading the list are located already), the audio path for ``--wav`` files."""
    if item.error is not None:
        return message
    if item.where:
        return f"{item.where} (key {item.key}): {message}"
    return message if item.wav and item.wav in message else f"{item.wav}: {message}"


def _prepare(model, item: Item, task: str, prompt: str | None, max_seconds: float, segment: str = "fixed",
             overlap_seconds: float = OVERLAP_SECONDS) -> list[_Unit] | str:
    if item.error is not None:
        return item.error
    if item.member is not None:
        tar, offset, size = item.member
        try:
            with open(tar, "rb") as f:
                f.seek(offset)
                src = f.read(size)
        except OSError as e:
            return f"cannot read {item.wav}: {e.strerror or e}"
        if len(src) != size:
            return f"{item.wav}: the tar ends inside this member"
    elif item.audio is not None:
        src = item.audio
    elif not Path(item.wav).is_file():
        return f"no such file: {item.wav}"
    else:
        src = item.wav
    prompt = prompt if prompt is not None else item.prompt
    cut = wav_truncation(src)
    if cut is not None:
        return f"truncated audio: the WAV header promises {cut[0]:.2f} s, the file holds {cut[1]:.2f} s"
    if prompt is None:
        try:
            model.prompt_for(task)
        except ValueError as e:  # names the task, the prompt file and the known tasks
            return str(e)
    try:
        wave = load_audio(src, start=item.start, end=item.end)
    except AudioError as e:
        return str(e)
    except OSError as e:
        return f"cannot read: {e}"
    text = prompt if prompt is not None else model.prompt_for(task)
    ids = model.encode_text(text)
    units = []
    for seg in segment_audio(wave, SAMPLE_RATE, mode=segment, max_seconds=max_seconds,
                             overlap_seconds=overlap_seconds):
        try:
            feats = log_mel_spectrogram(seg.samples, model.config.encoder.num_mel_bins)
        except AudioError as e:
            return str(e)
        units.append(_Unit(-1, seg.start, feats, ids, seg.end, seg.cut_in_speech))
    return units


def check_max_seconds(max_seconds: float, max_frames: int) -> None:
    """``ValueError`` for a window the encoder (``max_frames`` log-mel frames, 100 per second) cannot take."""
    limit = max_frames / 100.0
    if not 0 < max_seconds <= limit:
        raise ValueError(f"max_seconds={max_seconds:g}: windows must be longer than 0 s and at most {limit:g} s "
                         f"(the encoder takes {max_frames} frames)")


def mark_repeated_keys(items: Sequence[Item], *, strict: bool = True) -> None:
    """Keys used twice (results are matched to references, and resumed runs and shards to their inputs, by key):
    with ``strict`` a ``ValueError``; else each later use becomes an error record under a key of its own, its
    ``file:line`` (or its path), so that every record of a run has a unique key. Idempotent."""
    seen: dict[str, str] = {}
    for it in items:
        if it.error is not None:
            continue
        if it.key in seen:
            msg = (f"key {it.key!r} is used twice ({seen[it.key]} and {it.where or it.wav}); keys must be unique "
                   f"(--wav uses the file name without extension; use --data with explicit keys)")
            if strict:
                raise ValueError(msg)
            it.error = f"{it.where}: {msg}" if it.where else msg
            continue
        seen[it.key] = it.where or str(it.wav)
    taken = set(seen)
    for it in items:  # error records (bad lines, repeated keys) never share a key with another record
        if it.error is None:
            continue
        if it.key in taken:
            base = it.where or it.wav or it.key
            key, n = base, 2
            while key in taken:
                key, n = f"{base}#{n}", n + 1
            it.key = key
        taken.add(it.key)


def check_run_args(model, items: Sequence[Item], max_seconds: float, *, strict: bool = True) -> None:
    """``ValueError`` (before any audio is read) for a window the encoder cannot take; keys used twice (results
    are matched to references by key) raise with ``strict``, else the later uses become error records
    (:func:`mark_repeated_keys`)."""
    check_max_seconds(max_seconds, model.encoder.max_frames)
    mark_repeated_keys(items, strict=strict)


def run(model, items: Sequence[Item], *, task: str | None = None, prompt: str | None = None, batch_size: int = 8,
        decoding: str = "greedy", max_new_tokens: int | None = None, num_beams: int | None = None,
        max_seconds: float = MAX_SECONDS, progress: bool = True, engine: str = "auto",
        cache_implementation: str | None = None, generation: Mapping[str, Any] | None = None,
        loop_repeats: int = 0, loop_max_ngram: int = 8, segment: str = "vad",
        overlap_seconds: float = OVERLAP_SECONDS) -> Iterator[dict]:
    """Yield one result per item, in input order, each as soon as it and every item before it are done (a caller
    that writes them as they come loses at most the items still in flight when it is stopped).

    Audio over ``max_seconds`` is split by :func:`segment.segment_audio` (``segment``: ``"vad"``, cut at pauses,
    with ``overlap_seconds`` where a cut falls mid-speech; ``"fixed"``: equal windows) and the segments' outputs
    joined by :func:`segment.join_segments`: offsets in every field, de-duplicated overlaps, ``segments``
    (start, end, text, tags per segment) and, for ``<ALIGN>``, ``words`` (word, start, end).

    A result has ``key``, ``wav``, ``task``, ``prompt``, ``text`` (the raw output; windows joined), the parsed
    ``transcript`` and ``tags`` (+ ``timestamps`` for SRWT, ``answer`` for chat) and ``windows``; an unreadable
    file gives ``{"key", "wav", "task", "prompt", "error"}`` and the others continue. ``task`` overrides the items' own tasks.
    An item's own ``prompt`` (a list's ``prompt`` field, OSUM's ``extra.question``) is used unless ``prompt`` is
    given. ``generation``: GenerationConfig fields (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``no_repeat_ngram_size``, ...) over the ``decoding`` preset.
    ``engine`` and ``cache_implementation`` (``"static"`` or the default dynamic cache) go to
    :meth:`OSUMForConditionalGeneration.generate`, and so do ``loop_repeats`` / ``loop_max_ngram`` (the loop guard:
    a window whose output ends in one n-gram repeated ``loop_repeats`` times stops there; 0: off).
    """
    check_run_args(model, items, max_seconds, strict=False)
    bar = progress_bar(total=len(items), desc="infer", unit="utt") if progress else None
    chunk = max(1, batch_size) * 16
    overrides = {"max_new_tokens": max_new_tokens, "cache_implementation": cache_implementation,
                 **{k: v for k, v in (generation or {}).items() if v is not None}}
    if num_beams is not None:
        overrides["num_beams"] = num_beams
    if loop_repeats:
        overrides.update(loop_repeats=loop_repeats, loop_max_ngram=loop_max_ngram)
    try:
        for c0 in range(0, len(items), chunk):
            part = items[c0:c0 + chunk]
            results: list[dict] = []
            units: list[_Unit] = []
            for i, item in enumerate(part):
                t = normalize_task(task or item.task)
                prepared = _prepare(model, item, t, prompt, max_seconds, segment, overlap_seconds)
                p = prompt if prompt is not None else item.prompt
                p = p if p is not None or isinstance(prepared, str) else model.prompt_for(t)
                res = {"key": item.key, "wav": item.wav, "task": t, "prompt": p}
                if isinstance(prepared, str):
                    res["error"] = prepared = _located(item, prepared)
                    print(f"osum-infer: {prepared}", file=sys.stderr)
                else:
                    for u in prepared:
                        u.item = i
                    units += prepared
                    res["windows"] = len(prepared)
                results.append(res)
            windows: list[list[int]] = [[] for _ in results]  # each item's units
            for k, u in enumerate(units):
                windows[u.item].append(k)
            pending = [len(w) for w in windows]  # windows still to decode, per item
            order = sorted(range(len(units)), key=lambda k: -units[k].feats.shape[0])
            texts: dict[int, str] = {}
            done = 0  # results[:done] are yielded

            def finished():
                nonlocal done
                while done < len(results) and pending[done] == 0:
                    res = results[done]
                    if "error" not in res:
                        mine = sorted(windows[done], key=lambda k: units[k].offset)
                        res.update(join_segments([{"start": units[k].offset, "end": units[k].end,
                                                   "cut_in_speech": units[k].cut_in_speech} for k in mine],
                                                 [texts[k] for k in mine], res["task"]))
                    if bar is not None:
                        bar.update(1)
                    done += 1
                    yield res

            yield from finished()  # items before the first one with audio (errors) go at once
            for b0 in range(0, len(order), batch_size):
                idx = order[b0:b0 + batch_size]
                batch = [units[k] for k in idx]
                t_max = max(u.feats.shape[0] for u in batch)
                feats = np.zeros((len(batch), t_max, batch[0].feats.shape[1]), np.float32)
                for j, u in enumerate(batch):
                    feats[j, :u.feats.shape[0]] = u.feats
                lengths = np.array([u.feats.shape[0] for u in batch], np.int64)
                tokens = model.generate(feats, lengths, [u.prompt_ids for u in batch], decoding=decoding,
                                        engine=engine, **overrides)
                for k, toks in zip(idx, tokens):
                    texts[k] = model.decode_text(toks)
                    pending[units[k].item] -= 1
                yield from finished()
    finally:
        if bar is not None:
            bar.close()


def write_results(results: Iterable[dict], out: str | Path, fmt: str = "jsonl") -> tuple[int, int]:
    """Write results as jsonl or OSUM's ``key<TAB>text`` (line breaks and tabs in a text become spaces, so every
    result stays one line); returns ``(written, failed)``. Written to a temporary sibling and renamed into
    place when complete: an interrupted run leaves no half-written file at ``out``."""
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        ok, failed = _write_lines(results, f, fmt)
    return ok, failed


def _write_lines(results: Iterable[dict], f, fmt: str) -> tuple[int, int]:
    ok = failed = 0
    for r in results:
        error = "error" in r
        failed, ok = failed + error, ok + (not error)
        line = record_line(r, fmt)  # jsonl: failures too, with their error
        if line is not None:
            f.write(line.decode("utf-8"))
        f.flush()
    return ok, failed
