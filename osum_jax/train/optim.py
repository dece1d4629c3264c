"""optax: AdamW with OSUM's defaults, warm-up + inverse-sqrt (or cosine) schedule, clipping, accumulation,
and skipping of non-finite updates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """``warmup_inverse_sqrt``: OSUM's WarmupLR, ``lr * min(sqrt(w / s), s / w)`` with ``s = step + 1``;
    ``cosine``: linear warm-up (``lr * s / w``) then cosine decay towards 0 at ``cfg.steps``; ``constant``."""
    lr, w = cfg.learning_rate, max(1, cfg.warmup_steps)
    if cfg.schedule == "warmup_inverse_sqrt":
        def schedule(count):
            s = jnp.asarray(count, jnp.float32) + 1.0
            return lr * jnp.minimum(jnp.sqrt(w / s), s / w)
        return schedule
    if cfg.schedule == "cosine":  # evaluated at step + 1 like WarmupLR: the first update uses lr / w, not 0
        cosine = optax.warmup_cosine_decay_schedule(0.0, lr, w, max(cfg.steps, w + 1) + 1, end_value=0.0)
        return lambda count: cosine(count + 1)
    return optax.constant_schedule(lr)


class AccumulateState(NamedTuple):
    mini_step: jax.Array  # micro-batches accumulated in the current window, int32
    acc: Any  # running mean of the window's gradients (like the trainable params); () when grad_accum == 1
    bad: jax.Array  # a micro-batch of the current window had a non-finite gradient, bool
    inner: optax.OptState
    skipped: jax.Array  # windows skipped so far, int32
    last_norm: jax.Array  # global norm of the last window's mean gradient (before clipping), float32


def accumulate_skipping_nonfinite(inner: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
    """Average the gradients of ``k`` micro-batches and apply ``inner`` once per window, skipping the whole
    window's update if any of its micro-batches had a non-finite gradient.

    The window boundary is every ``k``-th call, whatever happens, so it stays aligned with the trainer's
    optimizer steps. A bad window leaves the parameters and ``inner``'s state (Adam moments, step count) as
    they were, and counts in ``skipped``. Non-finite gradients are zeroed before they are added, so they never
    reach the accumulator (``0 * nan`` would poison every later window). ``last_norm`` is the norm of the
    window's mean gradient: the one clipping sees.
    """

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params) if k > 1 else ()  # p's sharding
        return AccumulateState(jnp.zeros([], jnp.int32), zeros, jnp.zeros([], bool), inner.init(params),
                               jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

    def update(grads, state, params=None):
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        if k == 1:  # the window is this gradient: a non-finite one's update is discarded below, not zeroed first
            mean = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            norm = jnp.where(finite, optax.tree.norm(mean), 0.0)
        else:
            safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)).astype(jnp.float32), grads)
            mean = jax.tree.map(lambda a, g: a + g / k, state.acc, safe)
            norm = optax.tree.norm(mean)
        bad = state.bad | ~finite
        emit = state.mini_step == k - 1
        apply = emit & ~bad
        if k == 1:
            # Every call ends a window: selects, not a lax.cond between "update" and "hold". XLA fuses each select
            # into its consumer (the parameter add, the moment writes), where the cond's hold branch materialised
            # zero updates for every trainable tensor and the update went through memory before the parameter
            # add (TPU compiler, docs/benchmarks.md). A held step still keeps state and parameters bit for bit.
            upd, new_inner = inner.update(mean, state.inner, params)
            updates = jax.tree.map(lambda u, g: jnp.where(apply, u, jnp.zeros_like(u)).astype(g.dtype), upd, grads)
            new_inner = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new_inner, state.inner)
        else:
            # accumulating micro-steps skip the optimizer at run time (one branch of a cond executes)
            def step(_):
                upd, new_inner = inner.update(mean, state.inner, params)
                return jax.tree.map(lambda u, g: u.astype(g.dtype), upd, grads), new_inner

            def hold(_):
                return jax.tree.map(jnp.zeros_like, grads), state.inner

            updates, new_inner = jax.lax.cond(apply, step, hold, None)
        new_state = AccumulateState(
            mini_step=jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32),
            acc=() if k == 1 else jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), mean),
            bad=jnp.where(emit, False, bad),
            inner=new_inner,
            skipped=state.skipped + (emit & bad).astype(jnp.int32),
            last_norm=jnp.where(emit, norm, state.last_norm).astype(jnp.float32))
        return updates, new_state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Micro-steps accumulate ``grad_accum`` gradients (averaged); every boundary clips to ``grad_clip`` and
    applies AdamW (OSUM: weight decay on every trainable tensor, norms and biases included).

    A window (the ``grad_accum`` micro-batches of one optimizer step) with a non-finite gradient anywhere is
    skipped as a whole: parameters, Adam moments and step count stay as they were, and the next window starts
    clean (:func:`accumulate_skipping_nonfinite`; the trainer counts such steps).
    """
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay),
    )
    return accumulate_skipping_nonfinite(inner, cfg.grad_accum)
