"""OSUM's link between the speech encoder and the LLM (reference §2).

Forward, encoder output ``h [B, T1, D_enc]`` with valid lengths ``[B]``::

    x = GELU(conv(pad_left(h, 2)))  x3, strides (1, 2, 2)   [B, T3, D_enc]   (GxlConv1dSubsampling4, causal)
    x = LN(Linear(x))                                                        (LinearNoSubsampling)
    x = dropout(x * sqrt(D_enc) + pe_espnet[:T3])                            (PositionalEncoding, x32 for 1024)
    x = blocks(x, key_padding_mask)  pre-LN, 4 heads, ReLU FFN, all biases   (wenet TransformerEncoder)
    x = LN(x)
    y = Linear(x)                                                            [B, T3, D_llm]  (speech_llama_proj)

Length rules: each stride-2 conv maps a valid length ``L`` to ``ceil(L / 2)`` (OSUM's ``mask[:, :, 0::2]``);
with causal left padding no valid output ever sees right padding, so batching never changes valid outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import AdapterConfig
from .attention import SequenceMask, padding_mask, sequence_multiple
from .encoder_block import EncoderBlock
from .layers import Buffer, Conv1d, LayerNorm, Linear, as_dtype, param, split_key
from .ops import Ops
from .positions import espnet_sinusoids
from .stack import create_stacked, run_stacked


def conv_stack_lengths(lengths: jax.Array, strides: tuple[int, ...]) -> jax.Array:
    """Valid lengths after the causal conv stack: ``L -> ceil(L / s)`` per conv."""
    for s in strides:
        lengths = (lengths + s - 1) // s
    return lengths


class CausalConvDownsampler(nnx.Module):
    """``GxlConv1dSubsampling4``: causal Conv1d + GELU per stride. ``[B, T, D] -> [B, ceil(T/4), D]``."""

    def __init__(self, d: int, kernel: int, strides: tuple[int, ...], *, dtype, param_dtype,
                 ops: Ops | None = None, rngs: nnx.Rngs):
        self.convs = nnx.List([
            Conv1d(d, d, kernel, stride=s, padding=(kernel - 1, 0), axes=("conv_width", "embed_in", "embed"),
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for s in strides
        ])
        self.strides = tuple(strides)
        self.ops = ops if ops is not None else Ops()

    def __call__(self, x: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        for conv in self.convs:
            x = self.ops.gelu(conv(x))
        return x, conv_stack_lengths(lengths, self.strides)


class SpeechTransformer(nnx.Module):
    """wenet ``TransformerEncoder(input_layer='linear', pos_enc='abs_pos')``: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, d: int, cfg: AdapterConfig, *, dtype, param_dtype, remat: str, ops: Ops | None = None,
                 rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_proj = Linear(d, d, axes=("embed_in", "embed"), ops=ops, rngs=rngs, **kw)
        self.input_norm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.pos_table = param(jnp.asarray(espnet_sinusoids(cfg.max_positions, d), param_dtype),
                               ("positions", "embed"), Buffer)
        self.layers = create_stacked(
            lambda r: EncoderBlock(d, cfg.num_heads, cfg.ffn_dim, act=cfg.activation, key_bias=True,
                                   eps=cfg.layer_norm_eps, dropout_rate=cfg.dropout, ops=ops, rngs=r, **kw),
            cfg.num_layers, rngs)
        self.layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.cfg = cfg
        self.xscale = float(d) ** 0.5
        self.dtype = dtype
        self.remat = remat
        self.ops = ops

    def __call__(self, x: jax.Array, lengths: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        t = x.shape[1]
        if t > self.cfg.max_positions:
            raise ValueError(f"adapter input has {t} frames; the positional table holds {self.cfg.max_positions}")
        k_in, k_pos, k_layers = split_key(dropout_key, 3)
        x = self.ops.dropout(self.input_norm(self.input_proj(x)), self.cfg.dropout, k_in)
        x = x * jnp.asarray(self.xscale, self.dtype) + self.pos_table[:t].astype(self.dtype)
        x = self.ops.dropout(x, self.cfg.positional_dropout, k_pos)
        pad = -t % sequence_multiple(self.ops.attention_impl, self.dtype, x.shape[-1] // self.cfg.num_heads, t,
                                     self.ops.platform)
        if pad:  # once for all layers, as in the Whisper encoder
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        mask = SequenceMask(padding_mask(lengths, t + pad), prefix=True)
        x = run_stacked(self.layers, x, lambda layer, h, k: layer(h, mask, k), self.cfg.num_layers,
                        dropout_key=k_layers, remat=self.remat, ops=self.ops)
        return self.layer_norm(x[:, :t])


class Adapter(nnx.Module):
    """Encoder output ``[B, T1, D_enc]`` -> LLM-space speech embeddings ``[B, T3, D_llm]`` and lengths."""

    def __init__(self, d_enc: int, d_llm: int, cfg: AdapterConfig, *, dtype="float32", param_dtype="float32",
                 remat: str = "none", ops: Ops | None = None, rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        dt, pdt = as_dtype(dtype), as_dtype(param_dtype)
        self.downsample = CausalConvDownsampler(d_enc, cfg.conv_kernel, cfg.conv_strides, dtype=dt,
                                                param_dtype=pdt, ops=ops, rngs=rngs)
        self.transformer = SpeechTransformer(d_enc, cfg, dtype=dt, param_dtype=pdt, remat=remat, ops=ops, rngs=rngs)
        self.proj = Linear(d_enc, d_llm, axes=("embed_in", "embed"), dtype=dt, param_dtype=pdt, ops=ops, rngs=rngs)

    def __call__(self, h: jax.Array, lengths: jax.Array,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        x, lengths = self.downsample(h, lengths)
        x = self.transformer(x, lengths, dropout_key)
        return self.proj(x), lengths
