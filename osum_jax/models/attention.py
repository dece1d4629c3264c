"""Attention kernels and masks.

Shapes: queries ``[B, T, N, H]``, keys/values ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention),
boolean masks broadcastable to ``[B, N, T, S]`` where True means "may attend". Scores and softmax are
float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          impl: str = "xla") -> jax.Array:
    """Scaled dot-product attention (scale ``1/sqrt(H)``), ``[B, T, N, H]``."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def padding_mask(lengths: jax.Array, max_len: int) -> jax.Array:
    """``[B] -> [B, T]`` bool, True at valid frames ``t < lengths[b]``."""
    return jnp.arange(max_len)[None, :] < lengths[:, None]


def key_padding_mask(valid: jax.Array) -> jax.Array:
    """``[B, S]`` bool -> ``[B, 1, 1, S]``: every query may attend to every valid key (encoders)."""
    return valid[:, None, None, :]


def causal_padding_mask(valid: jax.Array) -> jax.Array:
    """``[B, S]`` bool -> ``[B, 1, S, S]``: query ``i`` attends to valid keys ``j <= i`` (decoder).

    Padding may sit anywhere in the sequence (OSUM leaves holes between prompt, speech and target); masked
    positions are never attended to, so the valid tokens behave exactly as if they were packed.
    """
    s = valid.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    return causal[None, None, :, :] & valid[:, None, None, :]
