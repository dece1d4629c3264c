"""Task keys, and task-aware parsing of model output text into result fields (pure Python, no torch).

OSUM's outputs (reference sections 5 and 7, labels lowercased in training):

* ASR + X: ``transcript<tag>`` (tags at the end, e.g. ``the weather is nice<adult><female>``)
* SRWT (``<TRANSCRIBE> <ALIGN>``): ``word<0.0,1.2>word<1.2,1.5>`` (times in seconds inside ``<>``)
* STTC (``<TRANSCRIBE> <S2TCHAT>``): ``transcript<开始回答>answer``
* tags only (``<AGE> <GENDER>`` ...): ``<child><male>``
"""

from __future__ import annotations

import re

from .contract import DEFAULT_TASK, normalize_task  # noqa: F401 (re-exported)

ANSWER_SEP = "<开始回答>"

# task key -> result field of its tag
TAG_TASKS = {"<EMOTION>": "emotion", "<GENDER>": "gender", "<AGE>": "age", "<STYLE>": "style",
             "<CAPTION>": "event"}
TAG_VOCAB = {
    "emotion": {"sad", "anger", "angry", "neutral", "happy", "surprise", "fear", "disgust"},
    "gender": {"male", "female"},
    "age": {"child", "adult", "old"},
    "style": {"新闻科普", "恐怖故事", "童话故事", "客服", "诗歌散文", "有声书", "日常口语"},
    "event": {"laugh", "laughter", "cough", "cry", "crying", "scream", "screaming", "sigh", "throat_clearing",
              "throat clearing", "throatclearing", "sneeze"},
}

_TAG = re.compile(r"<([^<>]*)>")
_STAMP = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*$")
_SPACES = re.compile(r"\s+")


def task_keys(task: str | None) -> list[str]:
    return normalize_task(task).upper().split()


def expected_tags(task: str | None) -> list[str]:
    """Tag fields a task produces, in output order (``<TRANSCRIBE> <AGE> <GENDER>`` -> ``["age", "gender"]``)."""
    return [TAG_TASKS[k] for k in task_keys(task) if k in TAG_TASKS]


def is_transcribe(task: str | None) -> bool:
    return "<TRANSCRIBE>" in task_keys(task)


def is_align(task: str | None) -> bool:
    return "<ALIGN>" in task_keys(task)


def is_chat(task: str | None) -> bool:
    return "<S2TCHAT>" in task_keys(task)


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def parse_timestamps(text: str) -> list[dict]:
    """``word<0.0,1.2>word2<1.2,1.5>`` -> ``[{"token": "word", "start": 0.0, "end": 1.2}, ...]``.

    The token of a timestamp is the text since the previous ``<...>`` (stripped); empty tokens are skipped.
    """
    items, last = [], 0
    for m in _TAG.finditer(text):
        stamp = _STAMP.match(m.group(1))
        token = _clean(text[last:m.start()])
        last = m.end()
        if stamp and token:
            items.append({"token": token, "start": float(stamp.group(1)), "end": float(stamp.group(2))})
    return items


def _classify(tags: list[str], expected: list[str]) -> dict[str, str]:
    """Assign tag strings to the task's tag fields: vocabulary first, then the remaining fields in order."""
    out: dict[str, str] = {}
    pending = []
    for tag in tags:
        field = next((f for f in expected if f not in out and tag in TAG_VOCAB[f]), None)
        if field is None:
            pending.append(tag)
        else:
            out[field] = tag
    for tag in pending:
        field = next((f for f in expected if f not in out), None)
        if field is None:
            break
        out[field] = tag
    return out


def parse_output(text: str, task: str | None) -> dict:
    """Task-aware fields of an output (or reference) text.

    Always: ``transcript`` (text without any ``<...>`` span, or the part before ``<开始回答>`` for chat) and
    ``tags`` (``{field: value}``, lowercased, for the tag fields the task asks for). SRWT adds ``timestamps``;
    chat adds ``answer``.
    """
    text = text or ""
    task = normalize_task(task)
    result: dict = {}
    body = text
    if is_chat(task):
        head, sep, answer = text.partition(ANSWER_SEP)
        body = head
        result["answer"] = _clean(answer) if sep else ""
    if is_align(task):
        result["timestamps"] = parse_timestamps(body)
    tags = []
    for m in _TAG.finditer(body):
        inner = m.group(1).strip()
        if not inner or _STAMP.match(inner):
            continue
        tags.append(inner.lower())
    result["tags"] = _classify(tags, expected_tags(task))
    if is_align(task):
        result["transcript"] = " ".join(item["token"] for item in result["timestamps"]) or _clean(_TAG.sub(" ", body))
    else:
        result["transcript"] = _clean(_TAG.sub(" ", body)) if is_transcribe(task) else ""
    return result


def join_windows(parts: list[tuple[float, str]], task: str | None) -> dict:
    """Combine the outputs of consecutive windows ``[(offset_seconds, text), ...]`` of one long recording.

    Transcripts are joined (no space between CJK characters), SRWT timestamps shifted by each window's offset,
    chat answers joined, and each tag field takes the value most windows agree on (ties: the earliest).
    """
    parsed = [(off, parse_output(t, task)) for off, t in parts]
    texts = [t for _, t in parts]
    result: dict = {}
    pieces = [p["transcript"] for _, p in parsed if p["transcript"]]
    joined = ""
    for piece in pieces:
        if joined and not (_is_cjk(joined[-1]) and _is_cjk(piece[0])):
            joined += " "
        joined += piece
    result["transcript"] = joined
    fields = {f for _, p in parsed for f in p["tags"]}
    tags = {}
    for f in expected_tags(task):
        if f not in fields:
            continue
        votes: dict[str, int] = {}
        for _, p in parsed:
            if f in p["tags"]:
                votes[p["tags"][f]] = votes.get(p["tags"][f], 0) + 1
        best = max(votes.values())
        tags[f] = next(p["tags"][f] for _, p in parsed if p["tags"].get(f) in votes and votes[p["tags"][f]] == best)
    result["tags"] = tags
    if is_align(task):
        result["timestamps"] = [dict(item, start=round(item["start"] + off, 3), end=round(item["end"] + off, 3))
                                for off, p in parsed for item in p["timestamps"]]
    if is_chat(task):
        result["answer"] = " ".join(p["answer"] for _, p in parsed if p["answer"])
    # one window: the model's own text; several: the joined fields written back in OSUM's output format, so
    # whatever re-parses ``text`` (osum-eval, the key<TAB>text format) sees the shifted timestamps, the
    # majority tags and a single answer separator
    result["text"] = texts[0] if len(texts) == 1 else format_output(result, task)
    if len(texts) > 1:
        result["window_texts"] = texts
    return result


def format_output(fields: dict, task: str | None) -> str:
    """Result fields -> a text in OSUM's output format for ``task`` (the inverse of :func:`parse_output`):
    ``transcript<tag>...``, ``word<0.0,1.2>word<1.2,1.5>...<tag>``, ``transcript<开始回答>answer``, ``<tag>...``."""
    task = normalize_task(task)
    if is_align(task):
        body = "".join(f"{t['token']}<{t['start']},{t['end']}>" for t in fields.get("timestamps", []))
    else:
        body = fields.get("transcript", "") if is_transcribe(task) else ""
    tags = fields.get("tags", {})
    body += "".join(f"<{tags[f]}>" for f in expected_tags(task) if f in tags)
    if is_chat(task):
        body += ANSWER_SEP + fields.get("answer", "")
    return body


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"
