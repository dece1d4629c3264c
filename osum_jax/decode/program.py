"""The decode program of one config on one mesh: greedy or beam search (``models/generate.py``) under ``jit``
with the training layout of the model state (``TrainProgram``'s shardings: the ``train.mesh`` rules, the frozen
parameters in ``train.frozen_param_dtype``), rows sharded over ``data x fsdp``.

Static shapes: a batch is ``rows`` utterances (``batch_per_device`` times the data-parallel size), its frames
padded up to the first of ``frame_buckets`` that holds them and its prompts to a multiple of ``prompt_multiple``;
padding rows have one frame and no prompt, and are dropped from the result. So a test set compiles once per
(frame bucket, prompt bucket) it uses, never per utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from osum_torch_infer.contract import PAD_PROMPT

from ..config import Config
from ..models.generate import beam_search, greedy_decode
from ..train.mesh import batch_sharding, data_parallel_size, global_to_host, put_batch
from ..train.step import TrainProgram, cast_params

DECODE_KEYS = ("feats", "feats_lengths", "prompt", "prompt_lengths")
DEFAULT_FRAME_BUCKETS = (500, 1000, 1500, 2000, 3000)


@dataclass(frozen=True)
class Decoding:
    """What to decode: ``greedy`` or ``beam`` (``num_beams``, ``length_penalty``, ``early_stopping``, as
    transformers' ``GenerationConfig``; the torch runtime's ``beam`` preset is 4 beams, length penalty 1.0)."""

    method: str = "greedy"
    max_new_tokens: int = 400
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = False

    def check(self) -> None:
        if self.method not in ("greedy", "beam"):
            raise ValueError(f"--decoding {self.method!r}: expected greedy or beam")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be an integer >= 1, got {self.num_beams}")


class DecodeProgram:
    """``decode(state, host_rows) -> token lists`` for one config on one mesh (real or topology devices)."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, decoding: Decoding, eos_id: int, *,
                 batch_per_device: int = 8, frame_buckets: Sequence[int] = DEFAULT_FRAME_BUCKETS,
                 prompt_multiple: int = 16, stop_early: bool = True):
        decoding.check()
        self.cfg, self.mesh, self.decoding, self.eos_id = cfg, mesh, decoding, int(eos_id)
        self.train = TrainProgram(cfg, mesh)  # the model state's layout and backend choices, as training's
        self.rows = batch_per_device * data_parallel_size(mesh)
        max_frames = 2 * cfg.model.encoder.max_source_positions
        self.frame_buckets = tuple(sorted({min(int(f), max_frames) for f in frame_buckets} | {max_frames}))
        self.prompt_multiple = prompt_multiple
        self.mel = cfg.model.encoder.num_mel_bins
        shardings = {k: batch_sharding(mesh, 3 if k == "feats" else 2 if k == "prompt" else 1) for k in DECODE_KEYS}
        self.batch_shardings = shardings
        t = self.train
        self._fn = jax.jit(partial(self._decode, stop_early=stop_early),
                           in_shardings=(t.trainable_shardings, t.frozen_shardings, t.buffer_shardings, shardings),
                           out_shardings=(batch_sharding(mesh, 2), batch_sharding(mesh, 1)))

    def _decode(self, trainable, frozen, buffers, batch, *, stop_early: bool):
        model = self.train.merge(trainable, frozen, buffers)
        d = self.decoding
        if d.method == "beam":
            return beam_search(model, batch, d.max_new_tokens, self.eos_id, d.num_beams, d.length_penalty,
                               d.early_stopping, stop_early=stop_early)
        return greedy_decode(model, batch, d.max_new_tokens, self.eos_id, stop_early=stop_early)

    # -- state ------------------------------------------------------------------------------------------------

    def place(self, model) -> tuple[Any, Any, Any]:
        """A loaded ``OSUM`` (any device) -> its state on the mesh, in the training layout."""
        _, t, f, b = nnx.split(model, self.train.filter, nnx.Param, ...)
        f = cast_params(f, self.train.frozen_dtype)
        return (jax.device_put(t, self.train.trainable_shardings), jax.device_put(f, self.train.frozen_shardings),
                jax.device_put(b, self.train.buffer_shardings))

    # -- shapes -------------------------------------------------------------------------------------------------

    def bucket(self, frames: int, prompt: int) -> tuple[int, int]:
        """The static ``(frames, prompt)`` of a batch whose longest rows have ``frames`` / ``prompt``."""
        t = next((b for b in self.frame_buckets if b >= frames), None)
        if t is None:
            raise ValueError(f"{frames} frames: longer than the encoder takes ({self.frame_buckets[-1]})")
        m = self.prompt_multiple
        return t, max(m, -(-prompt // m) * m)

    def host_batch(self, feats: Sequence[np.ndarray], prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Up to ``rows`` utterances (log-mel ``[T, mel]`` and prompt ids) -> a padded batch of static shape."""
        n = len(feats)
        if not 0 < n <= self.rows:
            raise ValueError(f"a batch holds 1 to {self.rows} utterances, got {n}")
        t, p = self.bucket(max(f.shape[0] for f in feats), max(len(q) for q in prompts))
        out = {"feats": np.zeros((self.rows, t, self.mel), np.float32),
               "feats_lengths": np.ones(self.rows, np.int32),
               "prompt": np.full((self.rows, p), PAD_PROMPT, np.int32),
               "prompt_lengths": np.zeros(self.rows, np.int32)}
        for i, (f, q) in enumerate(zip(feats, prompts)):
            out["feats"][i, :f.shape[0]] = f
            out["feats_lengths"][i] = f.shape[0]
            out["prompt"][i, :len(q)] = q
            out["prompt_lengths"][i] = len(q)
        return out

    def abstract_batch(self, frames: int, prompt: int) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = {"feats": ((self.rows, frames, self.mel), np.float32), "feats_lengths": ((self.rows,), np.int32),
                  "prompt": ((self.rows, prompt), np.int32), "prompt_lengths": ((self.rows,), np.int32)}
        return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_shardings[k]) for k, (s, d) in shapes.items()}

    # -- running ------------------------------------------------------------------------------------------------

    def decode(self, state, feats: Sequence[np.ndarray], prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each utterance's tokens up to (excluding) the first end-of-text id."""
        batch = put_batch(self.host_batch(feats, prompts), self.mesh)
        tokens, lengths = self._fn(*state, batch)
        tokens, lengths = global_to_host(tokens), global_to_host(lengths)
        return [tokens[i, :int(lengths[i])].tolist() for i in range(len(feats))]

    def lower(self, frames: int, prompt: int):
        """The program lowered for abstract inputs (``--plan --target``: compile it for a pod on this host)."""
        t = self.train
        return self._fn.lower(t.abstract_trainable, t.abstract_frozen, t.abstract_buffers,
                              self.abstract_batch(frames, prompt))
