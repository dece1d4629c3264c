"""The functional, donated train step that ``osum-train`` runs and ``osum-train --plan --target`` compiles.

The model state is split once into three groups (``nnx.split``)::

    trainable  the parameters that fire_module trains        [float32 masters]     donated, returned aliased
    frozen     every other parameter (the 7.6 B LLM in OSUM)  [train.frozen_param_dtype]   read-only input
    buffers    fixed tables (sinusoids)                        read-only input

and the step is a pure function ``(trainable, opt_state, frozen, buffers, batch, key) -> (trainable,
opt_state, metrics)`` jitted with explicit in/out shardings and ``donate_argnums=(0, 1)``: XLA updates the
trainable parameters and the optimizer state in place, and nothing frozen is ever an output (the step's output
bytes are the trainable and optimizer bytes plus a few scalars).

Everything here can be built abstractly (:meth:`TrainProgram.abstract_inputs`: ``ShapeDtypeStruct`` with
shardings, no device memory), which is how the AOT planner compiles the exact step for a TPU or GPU topology
on a CPU-only host. The trainer builds the same object over real devices.

Frozen parameters have their own sharding rules (``train.mesh.frozen_rules``): e.g. on a pure data-parallel
mesh a bf16 frozen LLM can stay whole on every device while the float32 trainable parameters and Adam state
are sharded, so the step never all-gathers 7.6 B frozen weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ..config import Config, ConfigError
from ..data.pipeline import BucketSpec, static_prompt_len
from ..models import OSUM, Ops
from ..models.generate import greedy_decode
from ..models.layers import as_dtype
from .mesh import BATCH_KEYS, batch_sharding, data_parallel_size, frozen_rules_of, state_shardings
from .optim import make_optimizer
from .trainable import trainable_filter

METRIC_KEYS = ("loss", "grad_norm", "num_tokens", "window_grad_norm", "skipped_windows")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def cast_params(state: nnx.State, dtype) -> nnx.State:
    """``state`` with every ``nnx.Param`` in ``dtype`` (arrays or ``ShapeDtypeStruct``); other variables as they are."""
    def cast(v):
        if not isinstance(v, nnx.Param):
            return v
        x = v.get_value()
        if x.dtype == dtype:
            return v
        y = jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding) if isinstance(x, jax.ShapeDtypeStruct) \
            else x.astype(dtype)
        return v.replace(y)
    return jax.tree.map(cast, state, is_leaf=_is_var)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves of ``abstract`` carrying the matching ``shardings`` leaves."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass
class StepInputs:
    """Abstract (or real) inputs of the train step, in its argument order."""

    trainable: Any
    opt_state: Any
    frozen: Any
    buffers: Any
    batch: dict
    key: Any

    def args(self) -> tuple:
        return self.trainable, self.opt_state, self.frozen, self.buffers, self.batch, self.key


class TrainProgram:
    """The train/eval/decode programs of one config on one mesh, and their state layout.

    Built from a config and a mesh only: the model is created abstractly (``nnx.eval_shape``), so this works
    for a mesh of real devices (the trainer) and of topology devices (the AOT planner) alike.
    """

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        tc, mc = cfg.train, cfg.model
        self.rules = tuple(tuple(r) for r in tc.mesh.rules)
        self.frozen_rules = frozen_rules_of(tc.mesh)
        self.filter = trainable_filter(tc.fire_module, mc.lora.enabled)
        self.frozen_dtype = as_dtype(tc.frozen_param_dtype)
        # the backend choices of this mesh (models/ops.py): kernels, barriers, dropout masks, activation sharding
        self.ops = Ops.from_config(mc, mesh=mesh, activation_rules=tc.mesh.activation_rules,
                                   dropout_rng=tc.dropout_rng)
        abstract = nnx.eval_shape(lambda: OSUM(mc, ops=self.ops, rngs=nnx.Rngs(tc.seed)))
        self.graphdef, t_abs, f_abs, b_abs = nnx.split(abstract, self.filter, nnx.Param, ...)
        f_abs = cast_params(f_abs, self.frozen_dtype)
        self.trainable_shardings = state_shardings(t_abs, mesh, self.rules)
        self.frozen_shardings = state_shardings(f_abs, mesh, self.frozen_rules)
        self.buffer_shardings = state_shardings(b_abs, mesh, self.rules)
        self.tx = make_optimizer(tc)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        o_abs = jax.eval_shape(self.tx.init, t_abs)
        self.opt_shardings = optax.tree_map_params(self.tx, lambda p, s: s, o_abs, self.trainable_shardings,
                                                   transform_non_params=lambda _: self.replicated)
        self.abstract_trainable = with_shardings(t_abs, self.trainable_shardings)
        self.abstract_frozen = with_shardings(f_abs, self.frozen_shardings)
        self.abstract_buffers = with_shardings(b_abs, self.buffer_shardings)
        self.abstract_opt = with_shardings(o_abs, self.opt_shardings)
        self.batch_shardings = {k: batch_sharding(mesh, 3 if k == "feats" else 2 if k in ("prompt", "target")
                                                  else 1) for k in BATCH_KEYS}
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.trainable_shardings, self.opt_shardings, self.frozen_shardings,
                          self.buffer_shardings, self.batch_shardings, self.replicated),
            out_shardings=(self.trainable_shardings, self.opt_shardings, self.replicated),
            donate_argnums=(0, 1))
        self.eval_step = jax.jit(self._eval_step, out_shardings=self.replicated)
        self.platform = self.ops.platform
        # "hash": threefry keys, masks from a counter hash of them (models/ops.py)
        self.rng_impl = "threefry2x32" if tc.dropout_rng == "hash" else tc.dropout_rng
        self.decode = jax.jit(self._decode, static_argnames=("max_new_tokens", "eos_id"))

    # -- the programs ---------------------------------------------------------------------------------------------

    def merge(self, trainable, frozen, buffers) -> OSUM:
        return nnx.merge(self.graphdef, trainable, frozen, buffers)

    def _train_step(self, trainable, opt_state, frozen, buffers, batch, key):
        def loss_fn(t):
            out = self.merge(t, frozen, buffers)(batch, key)
            return out["loss"], out["num_tokens"]

        (loss, ntok), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": gnorm, "num_tokens": ntok, "window_grad_norm": opt_state.last_norm,
                   "skipped_windows": opt_state.skipped}
        return trainable, opt_state, metrics

    def _eval_step(self, trainable, frozen, buffers, batch):
        out = self.merge(trainable, frozen, buffers)(batch)
        return {"loss": out["loss"], "num_tokens": out["num_tokens"]}

    def _decode(self, trainable, frozen, buffers, batch, *, max_new_tokens: int, eos_id: int):
        return greedy_decode(self.merge(trainable, frozen, buffers), batch, max_new_tokens=max_new_tokens,
                             eos_id=eos_id)

    # -- state ----------------------------------------------------------------------------------------------------

    def split(self, model: OSUM) -> tuple[Any, Any, Any]:
        """A concrete model -> (trainable, frozen cast to the frozen dtype, buffers) on this program's shardings."""
        _, t, f, b = nnx.split(model, self.filter, nnx.Param, ...)
        f = cast_params(f, self.frozen_dtype)
        return (jax.device_put(t, self.trainable_shardings), jax.device_put(f, self.frozen_shardings),
                jax.device_put(b, self.buffer_shardings))

    def init_state(self) -> tuple[Any, Any, Any]:
        """Random initialisation (``train.seed``) straight onto the mesh: (trainable, frozen, buffers)."""
        cfg = self.cfg

        def init():
            _, t, f, b = nnx.split(OSUM(cfg.model, ops=self.ops, rngs=nnx.Rngs(cfg.train.seed)), self.filter,
                                   nnx.Param, ...)
            return t, cast_params(f, self.frozen_dtype), b

        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=(self.trainable_shardings, self.frozen_shardings,
                                                self.buffer_shardings))()

    def init_opt(self, trainable) -> Any:
        with jax.set_mesh(self.mesh):
            return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(trainable)

    # -- abstract inputs (AOT) ------------------------------------------------------------------------------------

    def largest_batch(self) -> tuple[int, int, int, int]:
        """``(B, T, P, L)`` of the data config's bucket with the largest per-device work (frames + LLM tokens)."""
        spec = BucketSpec.from_config(self.cfg.data, devices=data_parallel_size(self.mesh),
                                      prompt_len=static_prompt_len(self.cfg.data))
        return max(spec.shapes, key=lambda s: (s[0] * (s[1] + s[1] // 8 + s[2] + s[3]), s[1], s[3]))

    def bucket_batch(self, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(B, T, P, L)`` of one ``(frames, target)`` bucket of the data config (every device's rows)."""
        spec = BucketSpec.from_config(self.cfg.data, devices=data_parallel_size(self.mesh),
                                      prompt_len=static_prompt_len(self.cfg.data))
        if tuple(bucket) not in spec.batch_sizes:
            raise ConfigError(f"bucket {bucket[0]}x{bucket[1]} is not one of the data config's: "
                              f"{' '.join(f'{f}x{t}' for f, t in sorted(spec.batch_sizes))}")
        return spec.batch_sizes[tuple(bucket)], bucket[0], spec.prompt_len, bucket[1]

    def abstract_batch(self, shape: tuple[int, int, int, int]) -> dict:
        b, t, p, l_ = shape
        i32 = jnp.int32
        dims = {"feats": ((b, t, self.cfg.model.encoder.num_mel_bins), jnp.float32), "feats_lengths": ((b,), i32),
                "prompt": ((b, p), i32), "prompt_lengths": ((b,), i32), "target": ((b, l_), i32),
                "target_lengths": ((b,), i32)}
        return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_shardings[k]) for k, (s, d) in dims.items()}

    def abstract_inputs(self, shape: tuple[int, int, int, int] | None = None) -> StepInputs:
        key = jax.ShapeDtypeStruct((), jax.random.key(0, impl=self.rng_impl).dtype, sharding=self.replicated)
        return StepInputs(self.abstract_trainable, self.abstract_opt, self.abstract_frozen, self.abstract_buffers,
                          self.abstract_batch(shape or self.largest_batch()), key)

    def dropout_key(self, micro_step: int) -> jax.Array:
        """The dropout key of micro-step ``m``: ``fold_in(fold_in(key(seed), 0xD20), m)`` (a stream of its own;
        ``nnx.Rngs(seed)`` hands out ``fold_in(key(seed), i)`` for parameter initialisation)."""
        root = jax.random.key(self.cfg.train.seed, impl=self.rng_impl)
        return jax.random.fold_in(jax.random.fold_in(root, 0xD20), micro_step)

    def lower(self, inputs: StepInputs):
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(*inputs.args())
