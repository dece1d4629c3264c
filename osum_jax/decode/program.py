"""The decode program of one config on one mesh: greedy or beam search (``models/generate.py``) under ``jit``
with the training layout of the model state (``TrainProgram``'s shardings: the ``train.mesh`` rules, the frozen
parameters in ``train.frozen_param_dtype``), rows sharded over ``data x fsdp``.

Static shapes: a batch is ``rows`` utterances (``batch_per_device`` times the data-parallel size), its frames
padded up to the first of ``frame_buckets`` that holds them and its prompts to a multiple of ``prompt_multiple``;
padding rows have one frame and no prompt, and are dropped from the result. So a test set compiles once per
(frame bucket, prompt bucket) it uses, never per utterance.

Several processes (``jax.distributed``): each passes ``decode`` its own utterances, up to ``local_rows`` (``rows``
over the process count) per call. Every call is a collective step: the processes first exchange their longest
rows (a tiny all-gather) so that all pad to the same bucket, each contributes its rows (dummy rows where it has
fewer, or none) to one global batch, and takes back the tokens of its own rows. A process whose utterances are
done calls ``drain``, which keeps taking part in steps with dummy rows until every process is done.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from osum_torch_infer.contract import PAD_PROMPT

from ..config import Config
from ..models.generate import beam_search, greedy_decode
from ..train.mesh import batch_sharding, data_parallel_size, from_every_process, global_to_host, put_batch
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
        if cfg.model.scan_unroll == "auto":
            # auto unrolls the layer stacks for training on TPU; decoding measured better scanned there (the greedy
            # row of docs/benchmarks.md, v5p x 16: 3185 ms a batch scanned, 3234 ms unrolled)
            cfg = replace(cfg, model=replace(cfg.model, scan_unroll=1))
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
        if jax.process_count() > 1:  # host values (the same on every process) -> the global layout
            t, f, b = jax.tree.map(np.asarray, (t, f, b))
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

    @property
    def local_rows(self) -> int:
        """Rows this process contributes to a batch (``rows`` when there is one process)."""
        return self.rows // jax.process_count()

    def host_batch(self, feats: Sequence[np.ndarray], prompts: Sequence[Sequence[int]], *, rows: int | None = None,
                   shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Up to ``rows`` utterances (log-mel ``[T, mel]`` and prompt ids) -> a padded batch of static shape
        (``shape``: the ``(frames, prompt)`` bucket, else the one these utterances need)."""
        n, rows = len(feats), self.rows if rows is None else rows
        if not (0 if shape else 1) <= n <= rows:
            raise ValueError(f"a batch holds 1 to {rows} utterances, got {n}")
        t, p = shape or self.bucket(max(f.shape[0] for f in feats), max(len(q) for q in prompts))
        out = {"feats": np.zeros((rows, t, self.mel), np.float32),
               "feats_lengths": np.ones(rows, np.int32),
               "prompt": np.full((rows, p), PAD_PROMPT, np.int32),
               "prompt_lengths": np.zeros(rows, np.int32)}
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
        if jax.process_count() > 1:
            if not feats:
                raise ValueError("a batch holds at least 1 utterance (a process with none calls drain)")
            return self._step(state, feats, prompts)
        batch = put_batch(self.host_batch(feats, prompts), self.mesh)
        tokens, lengths = self._fn(*state, batch)
        tokens, lengths = global_to_host(tokens), global_to_host(lengths)
        return [tokens[i, :int(lengths[i])].tolist() for i in range(len(feats))]

    def drain(self, state) -> int:
        """Several processes: take part (dummy rows) in the steps of those still decoding, until all are done.
        Returns the number of such steps; with one process, 0."""
        steps = 0
        while jax.process_count() > 1 and self._step(state, [], []) is not None:
            steps += 1
        return steps

    def _step(self, state, feats, prompts) -> list[list[int]] | None:
        n = len(feats)
        if n > self.local_rows:
            raise ValueError(f"a batch holds 1 to {self.local_rows} utterances on each process, got {n}")
        mine = np.array([n > 0, max((f.shape[0] for f in feats), default=1), max((len(q) for q in prompts),
                                                                                  default=0)], np.int64)
        every = from_every_process(mine)
        if not every[:, 0].any():
            return None  # every process is done (only drain gets here)
        shape = self.bucket(int(every[:, 1].max()), int(every[:, 2].max()))
        batch = put_batch(self.host_batch(feats, prompts, rows=self.local_rows, shape=shape), self.mesh)
        tokens, lengths = self._fn(*state, batch)
        tokens, lengths = _own_rows(tokens), _own_rows(lengths)
        return [tokens[i, :int(lengths[i])].tolist() for i in range(n)]

    def lower(self, frames: int, prompt: int):
        """The program lowered for abstract inputs (``--plan --target``: compile it for a pod on this host)."""
        t = self.train
        return self._fn.lower(t.abstract_trainable, t.abstract_frozen, t.abstract_buffers,
                              self.abstract_batch(frames, prompt))


def _own_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in the order it put them in (its addressable shards by
    row offset; shards replicated over other mesh axes counted once)."""
    parts = {}
    for sh in x.addressable_shards:
        parts.setdefault(sh.index[0].start or 0, sh.data)
    return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])
