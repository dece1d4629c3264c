"""Dynamic batching, admitted and scheduled by work (windows x beams), not by request.

Each request brings its windows (log-mel features + prompt ids), its decoding settings and its rows per window
(1 for greedy, the beam count otherwise). The queue holds windows: a request whose windows would take the queue
past ``max_queue`` windows is refused (:class:`QueueFull`, answered 503 with Retry-After).

The worker takes the request that should go first (the one with the fewest windows left; one that has waited
longer than ``starve_s`` goes first, oldest first), waits up to ``max_wait_ms`` per window it has for company
with the same settings, and fills one ``generate`` call with windows in that order: never more than ``max_batch`` rows
(windows x beams), never more than ``max_frames`` padded frames (windows x the longest window; the first window
always goes), and never a window that would make padding more than ``PAD_FACTOR`` times the batch's real
frames (a 30 s window does not join a batch of 2 s windows). A long request's windows are therefore spread over
several calls, and short requests are not held behind it: they go first when they wait together, and one that
arrives while a long request's call runs waits for that call only (``max_frames`` bounds it, like vLLM's
``max_num_batched_tokens``).

A request that is cancelled (its client went away, or its deadline passed) loses its queued windows at once.
A ``generate`` call that fails (e.g. CUDA out of memory) is retried as two halves, down to single windows,
before any caller sees the error; only the request owning a window that fails alone gets it.

**Streaming.** A request submitted with ``on_update`` (``stream=true`` on the API) hears of its windows' tokens as
the call generates them: a call holding such a window decodes through transformers' ``generate`` with a
:class:`RowStreamer`, which hands each step's new token of every streaming row to that row's request (on the
event loop, ``on_update(window, new_tokens, None)``; ``on_update(window, None, None)`` when a call (re)starts the
window, as a retried call does); every window's final text follows as ``on_update(window, [], text)``. The other rows of the call are decoded exactly as without streaming (the same
greedy tokens as the lean loop; a beam-search call streams nothing and each window's text comes when it ends). In
such a call a row whose request is gone (disconnect, deadline) stops at the next token (a stopping criterion), and
the call ends as soon as no row is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger("osum.serve")
PAD_FACTOR = 4.0  # padded frames of a batch <= PAD_FACTOR x its real frames (the first window always goes)


class QueueFull(RuntimeError):
    pass


@dataclass(eq=False)
class _Job:
    units: list  # [(feats [T, n_mels], prompt_ids)]
    settings: tuple  # hashable decoding settings: equal settings share a generate call
    rows: int  # generate rows per window (beams)
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    texts: list = field(default_factory=list)
    next: int = 0  # first window not yet taken
    left: int = 0  # windows not yet answered
    on_update: Callable[[int, list, str | None], None] | None = None  # streaming: (window, new tokens, final text)
    cancelled: bool = False  # read by the generate thread's stopping criterion

    def __post_init__(self):
        self.texts = [None] * len(self.units)
        self.left = len(self.units)

    @property
    def queued(self) -> int:
        return len(self.units) - self.next


class Batcher:
    def __init__(self, model, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
                 max_frames: int = 0, starve_s: float = 30.0, on_batch: Callable[[int, int, float], None] | None = None,
                 on_retry: Callable[[], None] | None = None):
        """``max_batch``: rows per ``generate`` call; ``max_queue``: queued windows; ``max_frames``: padded
        log-mel frames per call (0: no limit but ``max_batch``); ``on_batch(rows, tokens,
        seconds)`` is called after each successful call and ``on_retry()`` after each failed one (metrics)."""
        self.model, self.max_batch, self.max_wait = model, max(1, max_batch), max(0.0, max_wait_ms) / 1000.0
        self.max_queue, self.starve_s, self.on_batch, self.on_retry = max(1, max_queue), starve_s, on_batch, on_retry
        self.max_frames = max(0, int(max_frames))
        self.jobs: list[_Job] = []  # requests with windows still queued, in arrival order
        self.queued_windows = 0
        self.wakeup = asyncio.Event()
        self.stats = {"requests": 0, "batches": 0, "windows": 0, "rejected": 0, "cancelled_windows": 0,
                      "retried_batches": 0, "largest_batch_rows": 0}
        self._task: asyncio.Task | None = None
        self.generating = 0  # windows in the generate call now running

    @property
    def pending(self) -> list[_Job]:
        return self.jobs

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def submit(self, units: list, settings: dict[str, Any], rows: int = 1) -> list[str]:
        """Texts of ``units``, in order, once all their windows have been decoded."""
        return await self.result(self.enqueue(units, settings, rows))

    def enqueue(self, units: list, settings: dict[str, Any], rows: int = 1,
                on_update: Callable[[int, list, str | None], None] | None = None) -> _Job:
        """Queue a request's windows now (:class:`QueueFull`, ``ValueError`` at once); await :meth:`result`
        for their texts, or :meth:`cancel` it. ``on_update``: see the module's *Streaming*."""
        if rows > self.max_batch:
            raise ValueError(f"this decoding needs {rows} rows per window > the server's --max-batch "
                             f"{self.max_batch}")
        if self.queued_windows + len(units) > self.max_queue:
            self.stats["rejected"] += 1
            raise QueueFull(f"{self.queued_windows} windows are waiting; {len(units)} more would pass "
                            f"--max-queue {self.max_queue}")
        job = _Job(units, tuple(sorted(settings.items())), rows, asyncio.get_running_loop().create_future(),
                   on_update=on_update)
        self.jobs.append(job)
        self.queued_windows += len(units)
        self.stats["requests"] += 1
        self.wakeup.set()
        return job

    async def result(self, job: _Job) -> list[str]:
        """The texts of an enqueued request; cancelling the caller drops its windows."""
        try:
            return await job.future
        except asyncio.CancelledError:
            self._drop(job)
            raise

    def cancel(self, job: _Job) -> None:
        """Give a request up: its queued windows are dropped, its rows in a streaming call stop."""
        self._drop(job)

    def _drop(self, job: _Job) -> None:
        """Forget a request's queued windows (its windows already in a running call finish unanswered, or, in a
        streaming call, stop at their next token)."""
        job.cancelled = True
        if job in self.jobs:
            self.jobs.remove(job)
            self.queued_windows -= job.queued
            self.stats["cancelled_windows"] += job.queued
            job.next = len(job.units)
        if not job.future.done():
            job.future.cancel()

    def _order(self, now: float) -> list[_Job]:
        starved = [j for j in self.jobs if now - j.arrived > self.starve_s]
        rest = sorted((j for j in self.jobs if now - j.arrived <= self.starve_s), key=lambda j: (j.queued, j.arrived))
        return starved + rest  # starved ones oldest first (self.jobs is in arrival order)

    def _rows_waiting(self, settings: tuple) -> int:
        return sum(j.queued * j.rows for j in self.jobs if j.settings == settings)

    def _take(self, head: _Job) -> list[tuple[_Job, int]]:
        """One call's windows: ``[(job, window index)]``, at most ``max_batch`` rows, padding bounded."""
        batch: list[tuple[_Job, int]] = []
        rows = frames = t_max = 0
        for job in self._order(time.perf_counter()):
            if job.settings != head.settings:
                continue
            while job.queued and rows + job.rows <= self.max_batch:
                t = job.units[job.next][0].shape[0]
                padded = (len(batch) + 1) * max(t_max, t)
                if batch and (padded > PAD_FACTOR * (frames + t) or (self.max_frames and padded > self.max_frames)):
                    break
                batch.append((job, job.next))
                job.next += 1
                rows += job.rows
                frames += t
                t_max = max(t_max, t)
            if rows >= self.max_batch:
                break
        for job, _ in batch:
            if not job.queued and job in self.jobs:
                self.jobs.remove(job)
        self.queued_windows -= len(batch)
        return batch

    async def _run(self) -> None:
        while True:
            if not self.jobs:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            head = self._ready()
            if head is None:
                await asyncio.sleep(0.002)
                continue
            batch = self._take(head)
            await self._decode(batch, dict(head.settings))

    def _ready(self) -> _Job | None:
        """The request to build a call around now, or ``None`` to wait for company a little longer.

        The first request in order waits up to ``max_wait`` per window it has (a long request waits longer, so
        that short ones of the same burst, which go first, can still arrive), unless the rows waiting with the
        same settings (its own first window counted, its other windows not) already fill a call."""
        now = time.perf_counter()
        head = self._order(now)[0]
        if now >= head.arrived + self.max_wait * max(1, head.queued):
            return head
        others = self._rows_waiting(head.settings) - (head.queued - 1) * head.rows
        return head if others >= self.max_batch else None

    async def _decode(self, batch: list[tuple[_Job, int]], settings: dict[str, Any]) -> None:
        """Run one call; on failure, the two halves (recursively); route each window's text to its job."""
        live = [(j, i) for j, i in batch if not j.future.done()]  # windows of cancelled jobs are skipped
        if not live:
            return
        rows = sum(j.rows for j, _ in live)
        t0 = time.perf_counter()
        self.generating = len(live)
        streaming = any(j.on_update is not None for j, _ in live)
        try:
            texts, tokens = await asyncio.to_thread(
                self._generate, [j.units[i] for j, i in live], dict(settings),
                RowStreamer(asyncio.get_running_loop(), live) if streaming else None)
        except Exception as e:  # noqa: BLE001 - retried smaller; a single window's failure goes to its request
            if len(live) > 1:
                self.stats["retried_batches"] += 1
                if self.on_retry is not None:
                    self.on_retry()
                log.warning("generate failed on %d windows (%d rows): %s: %s; retrying as two halves",
                            len(live), rows, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self.generating = 0
                _free_accelerator_memory()
                half = len(live) // 2
                await self._decode(live[:half], settings)
                await self._decode(live[half:], settings)
                return
            self.generating = 0
            job = live[0][0]
            if not job.future.done():
                job.future.set_exception(e)
            self._drop(job)  # its other windows are not decoded for nothing
            return
        self.generating = 0
        self.stats["batches"] += 1
        self.stats["windows"] += len(live)
        self.stats["largest_batch_rows"] = max(self.stats["largest_batch_rows"], rows)
        if self.on_batch is not None:
            self.on_batch(rows, tokens, time.perf_counter() - t0)
        for (job, i), text in zip(live, texts):
            if job.future.done():
                continue
            if job.on_update is not None:
                job.on_update(i, [], text)
            job.texts[i] = text
            job.left -= 1
            if not job.left:
                job.future.set_result(list(job.texts))

    def _generate(self, units: list, settings: dict[str, Any],
                  streamer: "RowStreamer | None" = None) -> tuple[list[str], int]:
        order = sorted(range(len(units)), key=lambda k: -units[k][0].shape[0])
        t_max = units[order[0]][0].shape[0]
        feats = np.zeros((len(units), t_max, units[0][0].shape[1]), np.float32)
        for j, k in enumerate(order):
            feats[j, :units[k][0].shape[0]] = units[k][0]
        lengths = np.array([units[k][0].shape[0] for k in order], np.int64)
        decoding = settings.pop("decoding", "greedy")
        prompts = [units[k][1] for k in order]
        if streamer is None:
            tokens = self.model.generate(feats, lengths, prompts, decoding=decoding, **settings)
        else:
            tokens = self._generate_streaming(feats, lengths, prompts, decoding, settings, streamer, order)
        texts = [""] * len(units)
        for j, k in enumerate(order):
            texts[k] = self.model.decode_text(tokens[j])
        return texts, sum(len(t) for t in tokens)

    def _generate_streaming(self, feats: np.ndarray, lengths: np.ndarray, prompts: list, decoding: str,
                            settings: dict[str, Any], streamer: "RowStreamer", order: list[int]) -> list[list[int]]:
        """The same call through transformers' ``generate`` (``model.generate(input_features=...)``) with
        ``streamer`` (greedy) and a stopping criterion for rows whose request is gone; the new tokens of each row up
        to (excluding) the end of text, as ``generate_tokens`` returns them."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        gc = self.model.decoding_config(decoding, **settings)
        ends = gc.eos_token_id if gc.eos_token_id is not None else self.model.eos_token_id
        ends = {ends} if isinstance(ends, int) else set(ends)
        streamer.arrange(order, ends)
        mask = np.arange(feats.shape[1])[None, :] < lengths[:, None]
        width = max(1, max(len(p) for p in prompts))
        ids = np.zeros((len(prompts), width), np.int64)
        keep = np.zeros((len(prompts), width), np.int64)
        for j, p in enumerate(prompts):
            if p:
                ids[j, width - len(p):] = p
                keep[j, width - len(p):] = 1
        rows = streamer.rows

        class GoneRows(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                return torch.tensor([r[0].cancelled for r in rows], dtype=torch.bool, device=input_ids.device)

        # generate streams no beam search (nor stops single beams): those windows' texts come when the call ends
        extra = ({"streamer": streamer, "stopping_criteria": StoppingCriteriaList([GoneRows()])}
                 if int(gc.num_beams or 1) == 1 else {})
        out = self.model.generate(input_features=feats.transpose(0, 2, 1), feature_attention_mask=mask.astype(np.int64),
                                  input_ids=ids, attention_mask=keep, decoding=decoding, **extra, **settings)
        result = []
        for row in out.tolist():
            result.append(next((row[:i] for i, t in enumerate(row) if t in ends), row))
        return result


class RowStreamer:
    """A transformers streamer (``put`` / ``end``, the ``BaseStreamer`` interface) for one batched call: each
    step's new token of row ``j`` goes to that row's request on the event loop (its ``on_update``), up to the end
    of text; rows of requests that are not streaming, or are gone, are skipped. ``put`` runs in the generate
    thread: only ``loop.call_soon_threadsafe`` crosses over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, live: list):
        self.loop, self.live = loop, live
        self.rows: list = list(live)
        self.ended: list[bool] = [False] * len(live)
        self.ends: set = set()

    def arrange(self, order: list[int], ends: set) -> None:
        """Row ``j`` of the call is ``live[order[j]]`` (the batcher sorts windows by length)."""
        self.rows = [self.live[k] for k in order]
        self.ended = [False] * len(order)
        self.ends = ends
        # a window starts over (a retried call, after a failed one, streams it again from its first token)
        self.loop.call_soon_threadsafe(_deliver, [(job, i, None) for job, i in self.rows if job.on_update])

    def put(self, value) -> None:
        if value.dim() != 1:  # the prompt (empty: generate is given embeddings)
            return
        new = []
        for j, t in enumerate(value.tolist()):
            if self.ended[j]:
                continue
            if t in self.ends:
                self.ended[j] = True
                continue
            job, i = self.rows[j]
            if job.on_update is not None and not job.cancelled:
                new.append((job, i, t))
        if new:
            self.loop.call_soon_threadsafe(_deliver, new)

    def end(self) -> None:
        pass


def _deliver(new: list) -> None:
    """On the event loop: ``on_update(window, [token], None)``; ``token`` None: ``on_update(window, None, None)``,
    the window starts over."""
    for job, i, t in new:
        if not job.cancelled and not job.future.done():
            job.on_update(i, None if t is None else [t], None)


def _free_accelerator_memory() -> None:
    """Give cached blocks back after a failed call (CUDA/NPU out of memory), so the halves can fit."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        npu = getattr(torch, "npu", None)
        if npu is not None and npu.is_available():
            npu.empty_cache()
    except Exception:  # noqa: BLE001 - best effort only
        pass
