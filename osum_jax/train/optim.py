"""optax: AdamW with OSUM's defaults, warm-up + inverse-sqrt (or cosine) schedule, clipping, accumulation,
and skipping of non-finite updates."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from ..config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """``warmup_inverse_sqrt``: OSUM's WarmupLR, ``lr * min(sqrt(w / s), s / w)`` with ``s = step + 1``;
    ``cosine``: linear warm-up then cosine decay to 0 at ``cfg.steps``; ``constant``."""
    lr, w = cfg.learning_rate, max(1, cfg.warmup_steps)
    if cfg.schedule == "warmup_inverse_sqrt":
        def schedule(count):
            s = jnp.asarray(count, jnp.float32) + 1.0
            return lr * jnp.minimum(jnp.sqrt(w / s), s / w)
        return schedule
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, w, max(cfg.steps, w + 1), end_value=0.0)
    return optax.constant_schedule(lr)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Micro-steps accumulate ``grad_accum`` gradients (averaged); every boundary clips to ``grad_clip`` and
    applies AdamW (OSUM: weight decay on every trainable tensor, norms and biases included).

    A micro-batch whose gradient is non-finite is skipped before accumulation: it changes neither the
    parameters nor the accumulated gradient nor the optimizer's counters (the trainer counts such steps).
    """
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay),
    )
    accumulated = optax.MultiSteps(inner, every_k_schedule=cfg.grad_accum)
    return optax.apply_if_finite(accumulated, max_consecutive_errors=1_000_000)
