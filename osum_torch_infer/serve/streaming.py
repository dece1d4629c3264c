"""``stream=true``: server-sent events (``sse-starlette``) fed by the batcher's per-row token streamer.

``POST /v1/audio/transcriptions`` streams in OpenAI's shape: ``data: {"type": "transcript.text.delta", "delta":
"..."}`` events as the text grows, then one ``data: {"type": "transcript.text.done", "text": "..."}``; the deltas
joined are the done event's text. ``POST /v1/understand`` streams ``understand.partial`` events (the parsed fields so
far: ``transcript``, ``tags``, ``answer`` / ``timestamps`` where the task has them, the raw ``text`` and the
transcript's ``delta``), then ``understand.done`` with the whole non-streaming answer. A failure after the stream
has begun is a last ``{"type": "error", "error": "<one line>"}`` event.

What is shown grows only at the end: the windows of a long recording are shown in order (a later window decoded in
the same call waits until the ones before it are done), and a window's text is held back after an unclosed ``<``
(a tag or timestamp still being generated) and before an incomplete UTF-8 character.

Bounds: the request's tokens are kept once (per window, at most ``max_new_tokens``), and events are computed from
them when the reader is ready (a slow reader gets fewer, larger deltas; nothing queues per token). A send that
blocks for ``send_timeout`` seconds (a client that stopped reading) ends the stream (counted as
``osum_cancelled_total{reason="slow_reader"}``); a disconnect, the deadline (an ``error`` event just before the
guard's ``--request-timeout``) or any other end of the stream drops the request's queued windows and stops its rows
in the running call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError

from ..segment import join_segments
from .guard import DEADLINE_KEY  # noqa: F401 (re-exported)

log = logging.getLogger("osum.serve")


def visible(raw: str) -> str:
    """The part of a partial window text that will not change: cut before an unclosed ``<`` and a trailing
    replacement character (a UTF-8 character still incomplete)."""
    lt = raw.rfind("<")
    if lt > raw.rfind(">"):
        raw = raw[:lt]
    return raw.rstrip("\ufffd")


class Progress:
    """One request's segments as they are generated: ``update`` is the batcher's ``on_update``; ``segments`` are
    the request's spans (``start``, ``end``, ``cut_in_speech``), joined as the final answer joins them."""

    def __init__(self, segments: list[dict], task: str, decode: Callable[[list[int]], str]):
        self.segments, self.task, self.decode = segments, task, decode
        self.tokens: list[list[int]] = [[] for _ in segments]
        self.final: list[str | None] = [None] * len(segments)
        self.changed = asyncio.Event()

    def update(self, window: int, tokens: list | None, text: str | None) -> None:
        if tokens is None:
            self.tokens[window] = []
        else:
            self.tokens[window].extend(tokens)
        if text is not None:
            self.final[window] = text
        self.changed.set()

    def fields(self) -> dict:
        """The parsed fields of the segments done so far, in order, and the visible part of the next one."""
        texts = []
        for i, text in enumerate(self.final):
            if text is None:
                partial = visible(self.decode(self.tokens[i])) if self.tokens[i] else ""
                if partial:
                    texts.append(partial)
                break
            texts.append(text)
        if not texts:
            return {"transcript": "", "tags": {}, "text": ""}
        out = join_segments(self.segments[:len(texts)], texts, self.task)
        for key in ("window_texts", "segments", "words"):  # the done event has them; partial events stay small
            out.pop(key, None)
        return out


class Stream(EventSourceResponse):
    """An ``EventSourceResponse`` that gives its request up however it ends (the batcher's ``cancel``) and counts
    a reader too slow for ``send_timeout`` instead of logging a traceback."""

    def __init__(self, content, *, on_close: Callable[[], None], on_slow: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.on_close, self.on_slow = on_close, on_slow

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self.on_slow()
        finally:
            self.on_close()


def event(payload: dict) -> dict:
    return {"data": json.dumps(payload, ensure_ascii=False, allow_nan=False)}


async def events(job, batcher, progress: Progress, finish: Callable[[list[str]], dict], kind: str,
                 deadline: float | None, field: str = "transcript"):
    """The SSE events of one request (``kind``: ``transcription`` or ``understand``). ``finish(texts)`` is the
    non-streaming answer of the whole request; ``field`` the field whose growth the deltas carry."""
    shown = ""  # the text the deltas have carried so far
    last: dict[str, Any] = {"transcript": "", "tags": {}, "text": ""}  # nothing generated yet: no event
    job.future.add_done_callback(lambda _: progress.changed.set())
    margin = 0.5
    while True:
        left = None if deadline is None else deadline - time.perf_counter() - margin
        if left is not None and left <= 0:
            batcher.cancel(job)
            yield event({"type": "error", "error": "request not answered within the server's --request-timeout"})
            return
        try:
            await asyncio.wait_for(progress.changed.wait(), left)
        except asyncio.TimeoutError:
            continue
        progress.changed.clear()
        if job.future.done():
            break
        fields = progress.fields()
        now = fields.get(field, "")
        delta = now[len(shown):] if now.startswith(shown) else ""
        if kind == "transcription":
            if delta:
                shown = now
                yield event({"type": "transcript.text.delta", "delta": delta})
        elif fields != last:
            if delta:
                shown = now
            last = fields
            yield event({"type": "understand.partial", "delta": delta, **fields})
    if job.future.cancelled():
        return
    try:
        result = finish(job.future.result())
    except Exception:  # noqa: BLE001 - as the non-streaming answer's 500: logged here, one line to the client
        log.exception("streamed request failed")
        yield event({"type": "error", "error": "internal error"})
        return
    final = result.get(field, "")
    rest = final[len(shown):] if final.startswith(shown) else ""
    if kind == "transcription":
        if rest:
            yield event({"type": "transcript.text.delta", "delta": rest})
        yield event({"type": "transcript.text.done", "text": final})
    else:
        yield event({"type": "understand.done", "delta": rest, **result})
