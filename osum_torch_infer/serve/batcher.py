"""Dynamic batching: concurrent requests are queued and decoded together.

Each request brings its windows (log-mel features + prompt ids) and its decoding settings; the worker takes the
oldest request, then waits up to ``max_wait_ms`` for more requests with the *same* settings (requests that cannot
share a ``generate`` call wait for a later batch), up to ``max_batch`` windows, runs one batched ``generate`` in a
thread, and routes each window's text back to its caller. A full queue refuses new requests (:class:`QueueFull`,
answered 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QueueFull(RuntimeError):
    pass


@dataclass
class _Request:
    units: list  # [(feats [T, n_mels], prompt_ids)]
    settings: tuple  # hashable decoding settings: requests with equal settings share a batch
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, model, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64):
        self.model, self.max_batch, self.max_wait = model, max(1, max_batch), max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self.pending: collections.deque[_Request] = collections.deque()
        self.wakeup = asyncio.Event()
        self.stats = {"requests": 0, "batches": 0, "windows": 0, "rejected": 0}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def submit(self, units: list, settings: dict[str, Any]) -> list[str]:
        """Texts of ``units``, in order, once their batch has run."""
        if len(self.pending) >= self.max_queue:
            self.stats["rejected"] += 1
            raise QueueFull(f"{len(self.pending)} requests are waiting (max {self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(_Request(units, tuple(sorted(settings.items())), fut))
        self.stats["requests"] += 1
        self.wakeup.set()
        return await fut

    def _take(self) -> list[_Request]:
        first = self.pending.popleft()
        group, n = [first], len(first.units)
        for r in list(self.pending):
            if r.settings == first.settings and n + len(r.units) <= self.max_batch:
                group.append(r)
                n += len(r.units)
                self.pending.remove(r)
        return group

    async def _run(self) -> None:
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            first = self.pending[0]
            deadline = first.arrived + self.max_wait
            while time.perf_counter() < deadline and sum(
                    len(r.units) for r in self.pending if r.settings == first.settings) < self.max_batch:
                await asyncio.sleep(min(0.002, max(0.0, deadline - time.perf_counter())))
            group = self._take()
            units = [u for r in group for u in r.units]
            try:
                texts = await asyncio.to_thread(self._generate, units, dict(group[0].settings))
            except Exception as e:  # a failure of the batch reaches every caller in it
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            self.stats["batches"] += 1
            self.stats["windows"] += len(units)
            i = 0
            for r in group:
                if not r.future.done():
                    r.future.set_result(texts[i:i + len(r.units)])
                i += len(r.units)

    def _generate(self, units: list, settings: dict[str, Any]) -> list[str]:
        order = sorted(range(len(units)), key=lambda k: -units[k][0].shape[0])
        t_max = units[order[0]][0].shape[0]
        feats = np.zeros((len(units), t_max, units[0][0].shape[1]), np.float32)
        for j, k in enumerate(order):
            feats[j, :units[k][0].shape[0]] = units[k][0]
        lengths = np.array([units[k][0].shape[0] for k in order], np.int64)
        decoding = settings.pop("decoding", "greedy")
        tokens = self.model.generate(feats, lengths, [units[k][1] for k in order], decoding=decoding, **settings)
        texts = [""] * len(units)
        for j, k in enumerate(order):
            texts[k] = self.model.decode_text(tokens[j])
        return texts
