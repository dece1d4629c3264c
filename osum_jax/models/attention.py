"""Attention kernels and masks.

Shapes: queries ``[B, T, N, H]``, keys/values ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention),
boolean masks broadcastable to ``[B, N, T, S]`` where True means "may attend". Scores and softmax are
float32 whatever the input dtype.

``impl="xla"`` is this module's own einsum attention with a hand-written backward pass (below); other
implementations (``"cudnn"``) go to :func:`jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels

# what jax.nn.dot_product_attention puts at masked scores: finite, so a fully masked row is uniform, not NaN
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          impl: str = "xla") -> jax.Array:
    """Scaled dot-product attention (scale ``1/sqrt(H)``), ``[B, T, N, H]``."""
    if impl != "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    if mask is None:
        mask = jnp.ones((1, 1, 1, k.shape[1]), bool)
    if not kernels.enabled():  # plain autodiff of the same forward (models/kernels.py)
        return _attention_fwd_core(q, k, v, mask)[0]
    return _attention(q, k, v, mask)


# The einsum attention, same numerics as jax.nn.dot_product_attention(implementation="xla") up to float32
# rounding, with a hand-written VJP. Autodiff of the softmax makes XLA:CPU keep two [B, N, T, S] tensors per
# layer and run a [B, N, T, S] reduction plus broadcasts/selects in the backward pass; here the only residual of
# that size is the probabilities, the row term of the softmax backward is ``sum_h dO * O`` (a [B, N, T, H]
# reduction, the FlashAttention identity), and the mask enters as an additive bias of shape [B, 1, 1|T, S]
# (masked scores become the same -0.7 * f32max as jax's ``where``; their gradient is p * (...) = 0).
# Grouped-query heads are handled by a [K, G] head split instead of repeating keys/values.


def _mask_bias(mask: jax.Array, kv: int, groups: int) -> jax.Array:
    """Boolean mask broadcastable to ``[B, N, T, S]`` -> float32 bias broadcastable to ``[B, K, G, T, S]``."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mn, mt, ms = mask.shape
    mask = mask[:, :, None] if mn == 1 else mask.reshape(mb, kv, groups, mt, ms)
    return jnp.where(mask, jnp.float32(0.0), jnp.float32(_MASKED))


def _split_heads(x: jax.Array, kv: int) -> jax.Array:
    b, t, n, h = x.shape
    return x.reshape(b, t, kv, n // kv, h)


def _attention_fwd_core(q, k, v, mask):
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = _split_heads(q, kv)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * jnp.float32(1.0 / math.sqrt(h)) + _mask_bias(mask, kv, n // kv)
    p = jax.nn.softmax(s, axis=-1).astype(k.dtype)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v)
    return o.reshape(b, t, n, h), p


@jax.custom_vjp
def _attention(q, k, v, mask):
    return _attention_fwd_core(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    o, p = _attention_fwd_core(q, k, v, mask)
    return o, (q, k, v, mask, p, o)


def _attention_bwd(res, do):
    q, k, v, mask, p, o = res
    h = q.shape[-1]
    kv = k.shape[2]
    dog, og, qg = _split_heads(do, kv), _split_heads(o, kv), _split_heads(q, kv)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, dog)
    dp = jnp.einsum("btkgh,bskh->bkgts", dog, v, preferred_element_type=jnp.float32)
    row = jnp.einsum("btkgh,btkgh->bkgt", dog, og, preferred_element_type=jnp.float32)  # == sum_s p * dp
    ds = (p.astype(jnp.float32) * (dp - row[..., None]) * jnp.float32(1.0 / math.sqrt(h))).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, k).reshape(q.shape)
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), np.zeros(mask.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)


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
