"""The pre-LN transformer encoder block shared by the Whisper encoder and the adapter's speech transformer.

This is wenet's ``TransformerEncoderLayer`` with ``normalize_before=True`` (== Whisper's
``ResidualAttentionBlock``)::

    x = x + dropout(SelfAttn(LN1(x), key_padding_mask))
    x = x + dropout(W2(dropout(act(W1(LN2(x))))))
"""

from __future__ import annotations

import jax
from flax import nnx

from .attention import dot_product_attention, heads_major
from .layers import LayerNorm, Linear, split_key
from .ops import Ops


class SelfAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (``[B, T, D] -> [B, T, D]``)."""

    def __init__(self, d_model: int, num_heads: int, *, key_bias: bool, dtype, param_dtype, ops: Ops | None = None,
                 rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        kw = dict(dtype=dtype, param_dtype=param_dtype, ops=ops, rngs=rngs)
        self.q_proj = Linear(d_model, d_model, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d_model, d_model, axes=("embed", "heads"), use_bias=key_bias, **kw)
        self.v_proj = Linear(d_model, d_model, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d_model, d_model, axes=("heads", "embed"), **kw)
        self.num_heads = num_heads
        self.ops = ops

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        if heads_major(self.ops.attention_impl, self.q_proj.dtype, d // self.num_heads, t, self.ops.platform):
            q, k, v = (p.to_heads(x, self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
            return self.out_proj.from_heads(dot_product_attention(q, k, v, mask, self.ops, heads_major=True))
        shape = (b, t, self.num_heads, d // self.num_heads)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        o = dot_product_attention(q, k, v, mask, self.ops)
        return self.out_proj(o.reshape(b, t, d))


class EncoderBlock(nnx.Module):
    """One pre-LN block, ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, *, act: str, key_bias: bool, eps: float,
                 dropout_rate: float, dtype, param_dtype, ops: Ops | None = None, rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn_layer_norm = LayerNorm(d_model, eps=eps, **kw)
        self.self_attn = SelfAttention(d_model, num_heads, key_bias=key_bias, ops=ops, rngs=rngs, **kw)
        self.final_layer_norm = LayerNorm(d_model, eps=eps, **kw)
        self.fc1 = Linear(d_model, ffn_dim, axes=("embed", "mlp"), ops=ops, rngs=rngs, **kw)
        self.fc2 = Linear(ffn_dim, d_model, axes=("mlp", "embed"), ops=ops, rngs=rngs, **kw)
        self.act = act
        self.dropout_rate = dropout_rate
        self.ops = ops

    def __call__(self, x: jax.Array, mask: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        ops = self.ops
        k_attn, k_ffn_inner, k_ffn = split_key(dropout_key, 3)
        # with matmul barriers (ops.py): each LayerNorm's output cotangent is written once (XLA:TPU otherwise fuses
        # the LayerNorm backward's reductions into the transposed matmul that produces it), and fc2 reads its input
        # from memory instead of GELU + dropout recomputed per output tile
        h = self.self_attn(ops.output_barrier(self.self_attn_layer_norm(x)), mask)
        x = x + ops.dropout(h, self.dropout_rate, k_attn)
        h = ops.activation(self.act)(self.fc1(ops.output_barrier(self.final_layer_norm(x))))
        h = self.fc2(ops.input_barrier(ops.dropout(h, self.dropout_rate, k_ffn_inner)))
        return x + ops.dropout(h, self.dropout_rate, k_ffn)
