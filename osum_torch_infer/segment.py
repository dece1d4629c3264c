"""Long audio -> segments of at most 30 s cut at pauses (voice-activity detection), and the segments' outputs
joined back into one result with offsets, de-duplicated overlaps, per-segment fields and word timestamps.

Numpy and the standard library only at import; the VAD (``silero-vad``, which ships its model, in the
``torch`` extra) is imported when ``mode="vad"`` first needs it.

::

    from osum_torch_infer.segment import segment_audio, join_segments, to_srt

    segs = segment_audio(wave, 16000, mode="vad")          # [Segment(start, end, samples, cut_in_speech), ...]
    texts = [decode(s.samples) for s in segs]               # the model's raw output per segment
    result = join_segments(segs, texts, "<TRANSCRIBE> <ALIGN>")
    result["transcript"], result["segments"], result["words"]   # offsets in seconds of the whole recording
    open("out.srt", "w").write(to_srt(result["segments"]))

Segmentation (``mode="vad"``): audio of at most ``max_seconds`` is one segment. Longer audio is cut at pauses
the VAD finds, each segment at most ``max_seconds`` long and holding its speech with 0.2 s of silence either
side (longer silences between segments, and before the first speech and after the last, are in no segment, so
segments need not meet). A segment ends at the longest pause past its first quarter (the later one of equal
pauses), else at the latest pause that fits. A stretch of speech with no
pause within ``max_seconds`` is cut there, mid-speech (``cut_in_speech=True``), and the next segment starts
``overlap_seconds`` earlier, so that a word cut in two at the first segment's end is whole in the second.
``mode="fixed"`` is the old behaviour: equal windows of at most ``max_seconds``, no overlap, no VAD.

Joining (:func:`join_segments`): the words of an overlap appear in both segments' outputs. With ``<ALIGN>``
word timestamps, a word belongs to the segment on whose side of the overlap's middle its centre lies; for plain
text, the longest run of words the end of one segment and the start of the next share is kept once, and what the
first segment has after it and the second before it (the halves of the cut word) is dropped. The result's
``segments`` then meet at the overlap's middle instead of overlapping.
"""

from __future__ import annotations

import difflib
import math
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .formats.preset import MAX_SECONDS, SAMPLE_RATE
from .parsing import expected_tags, format_output, is_align, is_chat, join_windows, normalize_task, parse_output

OVERLAP_SECONDS = 1.0  # kept twice where a segment must be cut mid-speech (a word or two at speaking rate)
SPEECH_PAD_SECONDS = 0.2  # silence kept before and after the speech of a segment
MIN_SILENCE_MS = 100  # shortest pause the VAD reports as one (a pause between words of careful speech)
MODES = ("vad", "fixed")


@dataclass(frozen=True)
class Segment:
    """A stretch of one recording: ``start``/``end`` in seconds, its ``samples``, and whether its end cuts
    speech (then the next segment overlaps it by the overlap)."""

    start: float
    end: float
    samples: np.ndarray
    cut_in_speech: bool = False


def segment_audio(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, *, mode: str = "vad",
                  max_seconds: float = MAX_SECONDS, overlap_seconds: float = OVERLAP_SECONDS,
                  min_silence_ms: int = MIN_SILENCE_MS, threshold: float = 0.5) -> list[Segment]:
    """Split mono ``wave`` into segments of at most ``max_seconds`` (see the module docstring).

    ``mode``: ``"vad"`` (cut at pauses; audio up to ``max_seconds`` is one segment, without running the VAD) or
    ``"fixed"`` (equal windows, no overlap). ``overlap_seconds`` applies where ``vad`` must cut mid-speech;
    ``min_silence_ms`` and ``threshold`` are the VAD's. Audio in which the VAD finds no pause is cut mid-speech
    throughout; audio with no speech at all is cut into fixed windows. ``ValueError`` for a bad argument.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected mono audio [N], got shape {wave.shape}")
    if mode not in MODES:
        raise ValueError(f"segment mode {mode!r}: expected one of {', '.join(MODES)}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds:g}")
    if not 0 <= overlap_seconds < max_seconds / 2:
        raise ValueError(f"overlap_seconds must be >= 0 and below half of max_seconds ({max_seconds:g}), "
                         f"got {overlap_seconds:g}")
    n = wave.shape[0]
    limit = int(max_seconds * sample_rate)
    if n <= limit:
        return [Segment(0.0, n / sample_rate, wave, False)]
    if mode == "fixed":
        return _fixed(wave, sample_rate, limit)
    speech = speech_regions(wave, sample_rate, min_silence_ms=min_silence_ms, threshold=threshold)
    if not speech:
        return _fixed(wave, sample_rate, limit)
    return _cut_at_pauses(wave, sample_rate, speech, limit, int(round(overlap_seconds * sample_rate)),
                          int(round(SPEECH_PAD_SECONDS * sample_rate)))


def _fixed(wave: np.ndarray, sample_rate: int, limit: int) -> list[Segment]:
    n = wave.shape[0]
    k = math.ceil(n / limit)
    size = math.ceil(n / k)
    return [Segment(i * size / sample_rate, min(n, (i + 1) * size) / sample_rate, wave[i * size:(i + 1) * size])
            for i in range(k)]


def _cut_at_pauses(wave: np.ndarray, sample_rate: int, speech: list[tuple[int, int]], limit: int,
                   overlap: int, pad: int) -> list[Segment]:
    n = wave.shape[0]
    # the pauses between speech regions: (where the speech before ends, where the next starts)
    pauses = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(speech, speech[1:]) if b_start > a_end]
    last = min(n, speech[-1][1] + pad)
    segments, cur = [], max(0, speech[0][0] - pad)
    while last - cur > limit:
        # a pause whose speech before it ends (with its pad) inside the segment can end it; the segment ends
        # ``pad`` after that speech (or in the pause's middle, if it is shorter) and the next starts ``pad`` before
        # the speech after it: the silence between them is in no segment
        inside = [(min(a + pad, (a + b) // 2), max(b - pad, (a + b) // 2), b - a)
                  for a, b in pauses if cur < a and min(a + pad, (a + b) // 2) <= cur + limit]
        late = [c for c in inside if c[0] >= cur + limit // 4]
        if late:
            stop, nxt, _ = max(late, key=lambda c: (c[2], c[0]))
        elif inside:
            stop, nxt, _ = inside[-1]
        else:
            stop = None
        if stop is not None:
            segments.append(Segment(cur / sample_rate, stop / sample_rate, wave[cur:stop], False))
            cur = nxt
        else:
            stop = cur + limit
            segments.append(Segment(cur / sample_rate, stop / sample_rate, wave[cur:stop], True))
            cur = stop - overlap
    segments.append(Segment(cur / sample_rate, last / sample_rate, wave[cur:last], False))
    return segments


_VAD_LOCK = threading.Lock()  # the VAD model keeps state between calls: one caller at a time
_VAD_MODEL = None


def _silero():
    """The ``silero_vad`` module (``RuntimeError`` naming the install when it or torch is missing)."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("segmenting with the VAD needs torch and silero-vad: pip install 'osum-jax[torch]'") \
            from None
    threads = torch.get_num_threads()
    try:
        import silero_vad  # its import sets torch's thread count to 1 for the whole process: restored below
    except ImportError:
        raise RuntimeError("segmenting with the VAD needs silero-vad: pip install 'osum-jax[torch]' "
                           "(or pip install silero-vad); or use the fixed windows (--segment fixed)") from None
    finally:
        torch.set_num_threads(threads)
    return silero_vad


def check_vad() -> None:
    """``RuntimeError`` (naming what to install) unless the VAD can run: call before work that will need it."""
    with _VAD_LOCK:
        _silero()


def speech_regions(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, *, min_silence_ms: int = MIN_SILENCE_MS,
                   threshold: float = 0.5) -> list[tuple[int, int]]:
    """Speech in ``wave`` as ``[(start_sample, end_sample), ...]`` by Silero VAD (its packaged model, on the CPU;
    ``sample_rate`` 8000 or 16000). ``RuntimeError`` naming the extra when ``silero-vad`` is not installed."""
    global _VAD_MODEL
    if sample_rate not in (8000, 16000):
        raise ValueError(f"the VAD takes 8000 or 16000 Hz audio, got {sample_rate}")
    with _VAD_LOCK:
        silero_vad = _silero()
        import torch

        if _VAD_MODEL is None:
            with warnings.catch_warnings():  # its loader's own deprecation notices (importlib, torch.jit.load)
                warnings.simplefilter("ignore", DeprecationWarning)
                _VAD_MODEL = silero_vad.load_silero_vad()  # the model file shipped inside the silero-vad package
        # one thread: the VAD runs its small model on 32 ms chunks one after another, where more threads only
        # add synchronisation (measured here: 20 s of audio in 0.55 s on 1 thread, 3.0 s on 2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                stamps = silero_vad.get_speech_timestamps(
                    torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), _VAD_MODEL,
                    threshold=threshold, sampling_rate=sample_rate, min_silence_duration_ms=min_silence_ms,
                    speech_pad_ms=30)
        finally:
            torch.set_num_threads(threads)
    return [(int(s["start"]), int(s["end"])) for s in stamps]


# ---------------------------------------------------------------------------------------------------- joining

_TOKEN = re.compile(r"[\u4e00-\u9fff]|[^\s\u4e00-\u9fff]+")
_PUNCT = re.compile(r"[^\w]+")


def _norm(token: str) -> str:
    return _PUNCT.sub("", token.lower())


def _overlap_cut(prev: list[str], nxt: list[str], window: int) -> tuple[int, int] | None:
    """Where to cut two token lists whose ends overlap in time: ``(tokens of prev kept, tokens of nxt dropped)``
    around the longest run of (normalised) tokens the last ``window`` of ``prev`` and the first ``window`` of
    ``nxt`` share; ``None`` when they share none."""
    tail = [_norm(t) for t in prev[-window:]]
    head = [_norm(t) for t in nxt[:window]]
    m = difflib.SequenceMatcher(None, tail, head, autojunk=False).find_longest_match(0, len(tail), 0, len(head))
    if m.size == 0 or not any(tail[m.a:m.a + m.size]):
        return None
    return len(prev) - len(tail) + m.a + m.size, m.b + m.size


def _join_tokens(pieces: Sequence[str]) -> str:
    out = ""
    for piece in pieces:
        if not piece:
            continue
        if out and not (_is_cjk(out[-1]) and _is_cjk(piece[0])):
            out += " "
        out += piece
    return out


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def _span(field: Any, name: str) -> Any:
    return field[name] if isinstance(field, Mapping) else getattr(field, name)


def join_segments(segments: Sequence[Any], texts: Sequence[str], task: str | None) -> dict:
    """Join the raw outputs ``texts`` of ``segments`` (:class:`Segment`, or mappings/objects with ``start``,
    ``end`` and ``cut_in_speech``) of one recording into one result.

    Returns :func:`parsing.join_windows`'s fields (``transcript``, ``tags`` by majority, ``text``, and
    ``window_texts`` / ``timestamps`` / ``answer`` where it gives them) with overlaps de-duplicated, plus:

    * ``segments``: ``[{"id", "start", "end", "text", "tags"}]`` in seconds of the whole recording (``tags``: that
      segment's own; a segment's span is its audio, ending at the middle of an overlap with the next one);
    * ``words`` (``<ALIGN>`` tasks): ``[{"word", "start", "end"}]``, the model's word timestamps shifted by their
      segment's offset (OpenAI ``verbose_json``'s shape); ``timestamps`` holds the same as ``token``/start/end.
    """
    if len(segments) != len(texts):
        raise ValueError(f"{len(segments)} segments but {len(texts)} texts")
    if not segments:
        raise ValueError("no segments to join")
    task = normalize_task(task)
    starts = [float(_span(s, "start")) for s in segments]
    ends = [float(_span(s, "end")) for s in segments]
    cuts = [bool(_span(s, "cut_in_speech")) for s in segments]
    parsed = [parse_output(t, task) for t in texts]
    result = join_windows(list(zip(starts, texts)), task)
    # each segment's span in the result: an overlap is split at its middle
    lo, hi = list(starts), list(ends)
    for i in range(len(segments) - 1):
        if cuts[i] and starts[i + 1] < ends[i]:
            hi[i] = lo[i + 1] = (starts[i + 1] + ends[i]) / 2
    align = is_align(task)
    if align:
        words = [[dict(w, start=round(w["start"] + starts[i], 3), end=round(w["end"] + starts[i], 3))
                  for w in p["timestamps"]] for i, p in enumerate(parsed)]
        for i in range(len(segments) - 1):
            if cuts[i] and starts[i + 1] < ends[i]:
                mid = hi[i]
                words[i] = [w for w in words[i] if (w["start"] + w["end"]) / 2 <= mid]
                words[i + 1] = [w for w in words[i + 1] if (w["start"] + w["end"]) / 2 > mid]
                # a word longer than the overlap, heard in part on both sides of it: the same word, overlapping
                # in time, at the end of one and the start of the next is kept once, with its full span
                if words[i] and words[i + 1]:
                    a, b = words[i][-1], words[i + 1][0]
                    if _norm(a["token"]) == _norm(b["token"]) and b["start"] < a["end"]:
                        words[i][-1] = dict(a, end=max(a["end"], b["end"]))
                        words[i + 1] = words[i + 1][1:]
        pieces = [" ".join(w["token"] for w in ws) for ws in words]
        result["timestamps"] = [w for ws in words for w in ws]
        result["words"] = [{"word": w["token"], "start": w["start"], "end": w["end"]} for w in result["timestamps"]]
    else:
        pieces = [p["transcript"] for p in parsed]
        spans = [[m.span() for m in _TOKEN.finditer(pc)] for pc in pieces]
        keep = [[0, len(s)] for s in spans]  # tokens kept per piece: [first, last)
        for i in range(len(segments) - 1):
            if not (cuts[i] and starts[i + 1] < ends[i]):
                continue
            a = [pieces[i][x:y] for x, y in spans[i][keep[i][0]:keep[i][1]]]
            b = [pieces[i + 1][x:y] for x, y in spans[i + 1][keep[i + 1][0]:keep[i + 1][1]]]
            window = math.ceil((ends[i] - starts[i + 1]) * 6) + 2  # tokens that fit in the overlap, generously
            cut = _overlap_cut(a, b, window)
            if cut is not None:
                keep[i][1] = keep[i][0] + cut[0]
                keep[i + 1][0] += cut[1]
        trimmed = []
        for pc, sp, (first, last) in zip(pieces, spans, keep):
            trimmed.append(pc[sp[first][0]:sp[last - 1][1]] if first < last else "")
        pieces = trimmed
    if any(cuts[:-1]):
        result["transcript"] = _join_tokens(pieces)
        if len(texts) > 1:
            result["text"] = format_output(result, task)
    result["segments"] = []
    tag_fields = expected_tags(task)
    for i, p in enumerate(parsed):
        seg = {"id": i, "start": round(lo[i], 3), "end": round(hi[i], 3), "text": pieces[i]}
        if tag_fields:
            seg["tags"] = p["tags"]
        if is_chat(task):
            seg["answer"] = p["answer"]
        result["segments"].append(seg)
    return result


# -------------------------------------------------------------------------------------------- subtitle writers

def _clock(t: float, sep: str) -> str:
    ms = max(0, int(round(t * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def _cues(segments: Sequence[Mapping]) -> list[tuple[float, float, str]]:
    out = []
    for s in segments:
        text = _BREAKS.sub(" ", str(s.get("text", ""))).strip()
        if text:
            out.append((float(s["start"]), max(float(s["end"]), float(s["start"])), text))
    return out


def to_srt(segments: Sequence[Mapping]) -> str:
    """SubRip cues, one per segment with text (``start``, ``end`` in seconds, ``text``), numbered from 1."""
    return "".join(f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{t}\n\n"
                   for i, (a, b, t) in enumerate(_cues(segments), 1))


def to_vtt(segments: Sequence[Mapping]) -> str:
    """WebVTT: the header, then one cue per segment with text (``&``, ``<``, ``>`` escaped; ``-->`` cannot
    appear in a cue)."""
    def esc(t: str) -> str:
        return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return "WEBVTT\n\n" + "".join(f"{_clock(a, '.')} --> {_clock(b, '.')}\n{esc(t)}\n\n"
                                  for a, b, t in _cues(segments))


def verbose_json(result: Mapping, duration: float, *, words: bool = False, language: str | None = None) -> dict:
    """OpenAI's ``verbose_json`` transcription shape from a joined result: ``task``, ``duration``, ``text``,
    ``segments`` (``id``, ``seek``, ``start``, ``end``, ``text``) and, with ``words`` (OpenAI's
    ``timestamp_granularities[]=word``), ``words`` (``word``, ``start``, ``end``; empty unless the task was
    ``<ALIGN>``: plain transcription has segment times only). ``language`` is included when given."""
    out: dict = {"task": "transcribe", "duration": round(float(duration), 3), "text": result.get("transcript", "")}
    if language is not None:
        out["language"] = language
    out["segments"] = [{"id": s["id"], "seek": int(round(s["start"] * 100)), "start": s["start"], "end": s["end"],
                        "text": s["text"]} for s in result.get("segments", [])]
    if words:
        out["words"] = [dict(w) for w in result.get("words", [])]
    return out
