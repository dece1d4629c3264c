"""Multi-host: every process trains on a batch of the same bucket in each step.

Each process reads its own share of the data and batches it by bucket (``data/pipeline.py``), so in one step
process 0 may hold a 7 x 500-frame batch while process 1 holds 1 x 2900 frames. Padding both to the
element-wise largest shape (7 x 2900) breaks the frame budget and compiles shapes nobody planned for. Instead:

1. every process offers its next batch (the oldest held-back one first) and the processes all-gather the
   offered buckets (one tiny all-gather per step);
2. the step's bucket is the most offered one (ties: the smallest), the same rule on every process;
3. a process whose offer is another bucket holds it back and takes a held-back batch of the agreed bucket, or
   reads ahead up to ``MAX_READ_AHEAD`` batches for one (holding the others back); if none turns up it takes
   part with a batch of padding rows of the agreed shape (no loss) and keeps its data for later steps.

Held-back batches are part of the checkpointed data state (the global indices of their utterances, refetched
and re-padded on resume, as the pipeline's own bucket buffers are), so a restarted run continues exactly. With
one process this is a pass-through.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

MAX_READ_AHEAD = 8


def bucket_of(batch: dict) -> tuple[int, int]:
    return int(batch["feats"].shape[1]), int(batch["target"].shape[1])


class AgreedBatches:
    """Wraps a data iterator (``DataPipeline.dataset()``) so that all processes' batches share one bucket per
    step. ``next_batch()`` returns this process's batch, or None when its data has run out."""

    def __init__(self, it: Iterator[dict], *, spec, refetch: Callable[[int], dict], mel_bins: int,
                 gather: Callable[[np.ndarray], np.ndarray], process_count: int):
        self.it, self.spec, self.refetch, self.mel_bins = it, spec, refetch, mel_bins
        self.gather, self.multi = gather, process_count > 1
        self.held: list[dict] = []
        self.padding_steps = 0  # steps this process took part in with padding rows only

    def next_batch(self) -> dict | None:
        if not self.multi:
            return next(self.it, None)
        offer = self.held.pop(0) if self.held else next(self.it, None)
        mine = [1, *bucket_of(offer)] if offer is not None else [0, 0, 0]
        every = self.gather(np.asarray(mine, np.int64))
        if not every[:, 0].all():  # someone's data ended: the trainer stops every process this step
            if offer is not None:
                self.held.insert(0, offer)
            return offer
        offers = [tuple(int(v) for v in row[1:]) for row in every]
        agreed = min(set(offers), key=lambda b: (-offers.count(b), b))
        if bucket_of(offer) == agreed:
            return offer
        self.held.insert(0, offer)
        for i, h in enumerate(self.held):
            if bucket_of(h) == agreed:
                return self.held.pop(i)
        for _ in range(MAX_READ_AHEAD):
            nxt = next(self.it, None)
            if nxt is None:
                break
            if bucket_of(nxt) == agreed:
                return nxt
            self.held.append(nxt)
        self.padding_steps += 1
        return self.spec.pad([], agreed, self.mel_bins)

    # -- checkpointed state ---------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        # every row's global element number (-1: a padding row), so the device-major row layout comes back
        held = [[list(bucket_of(b)), [int(i) for i in b["indices"]]] for b in self.held]
        return {"iterator": self.it.get_state(), "held": held, "padding_steps": self.padding_steps}

    def set_state(self, state: dict[str, Any]) -> None:
        if "iterator" not in state:  # written before held-back batches existed: the iterator's own state
            self.it.set_state(state)
            return
        self.it.set_state(state["iterator"])
        self.held = [self.spec.pad([self.refetch(g) if g >= 0 else None for g in indices], tuple(bucket),
                                   self.mel_bins) for bucket, indices in state["held"]]
        self.padding_steps = int(state.get("padding_steps", 0))
