"""SpecAug and SpecSub as in OSUM/wenet, driven by an explicit numpy Generator (deterministic per sample)."""

from __future__ import annotations

import numpy as np


def spec_aug(x: np.ndarray, rng: np.random.Generator, num_t_mask: int = 2, num_f_mask: int = 2, max_t: int = 50,
             max_f: int = 10) -> np.ndarray:
    """Zero ``num_t_mask`` time spans (1..max_t frames) and ``num_f_mask`` bands (1..max_f bins) of ``[T, F]``."""
    y = x.copy()
    t, f = y.shape
    for _ in range(num_t_mask):
        start = int(rng.integers(0, t))
        end = min(t, start + int(rng.integers(1, max_t + 1)))
        y[start:end, :] = 0.0
    for _ in range(num_f_mask):
        start = int(rng.integers(0, f))
        end = min(f, start + int(rng.integers(1, max_f + 1)))
        y[:, start:end] = 0.0
    return y


def spec_sub(x: np.ndarray, rng: np.random.Generator, num_t_sub: int = 3, max_t: int = 30) -> np.ndarray:
    """Replace ``num_t_sub`` spans ``[s, e)`` by the earlier frames ``[s - p, e - p)``, ``p ~ U[0, s]``."""
    y = x.copy()
    t = y.shape[0]
    for _ in range(num_t_sub):
        start = int(rng.integers(0, t))
        end = min(t, start + int(rng.integers(1, max_t + 1)))
        pos = int(rng.integers(0, start + 1))
        y[start:end, :] = x[start - pos:end - pos, :]
    return y
