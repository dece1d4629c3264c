"""The contract between the JAX side (data pipeline, model, trainer) and the torch runtime, written once.

Torch-free and JAX-free (numpy only): ``osum_jax`` imports it, and the torch runtime uses it on GPU/NPU hosts.

A batch is a dict of arrays (numpy, JAX or torch)::

    feats          [B, T, n_mels] float   log-mel frames, zero-padded after feats_lengths
    feats_lengths  [B] int                valid frames per utterance, in [1, T]
    prompt         [B, P] int             prompt token ids, padded with PAD_PROMPT (optional)
    prompt_lengths [B] int                valid prompt tokens, in [0, P]
    target         [B, L] int             label ids incl. the final end-of-text id, padded with IGNORE_ID
    target_lengths [B] int                valid target tokens, in [0, L]
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# the dtype table lives with the package's other small tables (osum_torch_infer.formats.preset); re-exported here
from .formats.preset import DTYPE_ALIASES, SHORT_DTYPE, dtype_long, dtype_short  # noqa: F401

BATCH_KEYS = ("feats", "feats_lengths", "prompt", "prompt_lengths", "target", "target_lengths")
PAD_PROMPT = -1  # prompt padding (never looked up: positions past prompt_lengths are masked)
IGNORE_ID = -100  # target padding, ignored by the loss (torch's CrossEntropyLoss convention)
DEFAULT_TASK = "<TRANSCRIBE>"
AUDIO_SUFFIXES = ("wav", "flac", "mp3", "ogg", "opus", "m4a", "wma")  # audio members of a tar shard, in preference


def normalize_task(task: str | None) -> str:
    """``"<TRANSCRIBE><GENDER>"`` -> ``"<TRANSCRIBE> <GENDER>"``; empty/None -> ``<TRANSCRIBE>``."""
    if task is None or not str(task).strip():
        return DEFAULT_TASK
    return " ".join(re.sub(r">\s*<", "> <", str(task).strip()).split())


def _host(x: Any) -> np.ndarray:
    return np.asarray(x.cpu() if hasattr(x, "cpu") and callable(x.cpu) else x)


def check_batch(batch: Mapping[str, Any], *, num_mel_bins: int, vocab_size: int, max_frames: int | None = None,
                values: bool = True) -> None:
    """Validate a batch against the contract; raises ``ValueError`` naming the offending key.

    Shapes are always checked; values (lengths, token ids) only with ``values`` (the JAX side passes False for
    traced arrays inside ``jit``).
    """
    missing = [k for k in ("feats", "feats_lengths", "target", "target_lengths") if k not in batch]
    if "prompt" in batch and "prompt_lengths" not in batch:
        missing.append("prompt_lengths")
    if missing:
        raise ValueError(f"batch is missing key(s) {missing}; expected {list(BATCH_KEYS)}")
    shape = tuple(batch["feats"].shape)
    if len(shape) != 3 or shape[-1] != num_mel_bins:
        raise ValueError(f"batch['feats'] has shape {shape}; expected [B, T, {num_mel_bins}]")
    b, t = shape[:2]
    if max_frames is not None and t > max_frames:
        raise ValueError(f"batch['feats'] has {t} frames; the encoder accepts at most {max_frames}")
    checks = [("feats_lengths", 1), ("target", 2), ("target_lengths", 1)]
    if "prompt" in batch:
        checks += [("prompt", 2), ("prompt_lengths", 1)]
    for key, ndim in checks:
        s = tuple(batch[key].shape)
        if ndim == 1 and s != (b,):
            raise ValueError(f"batch[{key!r}] has shape {s}; expected [{b}]")
        if ndim == 2 and (len(s) != 2 or s[0] != b):
            raise ValueError(f"batch[{key!r}] has shape {s}; expected [{b}, N]")
    if not values:
        return
    fl = _host(batch["feats_lengths"])
    if fl.min() < 1 or fl.max() > t:
        raise ValueError(f"batch['feats_lengths'] must lie in [1, {t}], got {fl.tolist()}")
    for ids_key, len_key in (("prompt", "prompt_lengths"), ("target", "target_lengths")):
        if ids_key not in batch:
            continue
        ids, lens = _host(batch[ids_key]), _host(batch[len_key])
        if lens.size and (lens.min() < 0 or lens.max() > ids.shape[1]):
            raise ValueError(f"batch[{len_key!r}] must lie in [0, {ids.shape[1]}], got {lens.tolist()}")
        valid = np.arange(ids.shape[1])[None, :] < lens[:, None]
        bad = valid & ((ids < 0) | (ids >= vocab_size))
        if ids_key == "target":
            bad &= ids != IGNORE_ID
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"batch[{ids_key!r}][{r}, {c}] = {ids[r, c]} is not a token id in [0, {vocab_size})")
