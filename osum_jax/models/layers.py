"""Small building blocks shared by the OSUM modules.

Every parameter is created through :func:`param`, which attaches logical axis names (``out_sharding``
metadata, see :mod:`osum_jax.models.axes`) without sharding eagerly: the trainer maps the logical names to
mesh axes with one rules table. Kernels are stored ``[in, out]`` (Hugging Face torch stores ``[out, in]``).

Parameters live in ``param_dtype``; computation casts them to the module's ``dtype``. Normalisations and
softmaxes are computed in float32 whatever the compute dtype is.

Dropout is explicit: a module applies dropout (``Ops.dropout``) only when it is given a PRNG key (``dropout_key``),
so a forward pass without a key is deterministic evaluation. There is no hidden train/eval mode to forget
(OSUM's own inference scripts ran with dropout on because they never called ``model.eval()``).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .ops import Ops

Axes = tuple[str | None, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str | jnp.dtype) -> jnp.dtype:
    return DTYPES[name] if isinstance(name, str) else name


def param(value: jax.Array, axes: Axes, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A variable annotated with logical axis names (one per dimension), sharded later by the trainer."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} axis names {axes} for a {value.ndim}-d parameter {value.shape}")
    return kind(value, out_sharding=tuple(axes), eager_sharding=False)


class Buffer(nnx.Variable):
    """A fixed, non-trainable tensor that is still part of the checkpoint (e.g. sinusoidal position tables).

    OSUM's checkpoints carry these tables (``*.pos_enc.pe``); keeping them as state lets the converter load
    the released values bit-exactly instead of recomputing them.
    """


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys from ``key``, or ``n`` Nones when dropout is off."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def torch_linear_init(key: jax.Array, shape: Sequence[int], fan_in: int, dtype) -> jax.Array:
    """torch ``nn.Linear``/``nn.Conv1d`` default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``. kernel ``[in, out]`` with logical axes ``axes``; bias ``[out]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        init_std: float | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        ops: Ops | None = None,
        rngs: nnx.Rngs,
    ):
        key = rngs.params()
        if init_std is None:
            w = torch_linear_init(key, (in_features, out_features), in_features, param_dtype)
        else:
            w = init_std * jax.random.normal(key, (in_features, out_features), param_dtype)
        self.kernel = param(w, axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
        self.dtype = dtype
        self.ops = ops if ops is not None else Ops()

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def to_heads(self, x: jax.Array, heads: int) -> jax.Array:
        """``[B, T, in] -> [B, N, T, out / N]``: the projection emitted heads-major (same values as ``self(x)``
        reshaped and transposed; the compiler folds the transpose into the matmul; attention.py's layouts)."""
        w = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("btd,dnh->bnth", x.astype(self.dtype), w.reshape(w.shape[0], heads, -1))
        if self.bias is not None:
            b = self.bias[...].astype(self.dtype).reshape(heads, -1)
            y = self.ops.add_heads_bias(y, b)
        return y

    def from_heads(self, x: jax.Array) -> jax.Array:
        """``[B, N, T, H] -> [B, T, out]``, ``self`` applied to the heads concatenated along features."""
        n, h = x.shape[1], x.shape[3]
        y = jnp.einsum("bnth,nhd->btd", x.astype(self.dtype), self.kernel[...].astype(self.dtype).reshape(n, h, -1))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """torch-style LayerNorm (biased variance), computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis_name: str = "norm", dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = checkpoint_name(x32.mean(-1, keepdims=True), "norm_stats")
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * checkpoint_name(jax.lax.rsqrt(var + self.eps), "norm_stats")
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen2/LLaMA RMSNorm, as Hugging Face computes it: normalise in float32, cast, then scale."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        # the per-row statistic is named so that remat keeps it ([..., 1] float32) instead of reducing again
        y = x32 * checkpoint_name(jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps),
                                  "norm_stats")
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Conv1d(nnx.Module):
    """1-D convolution over time, ``[B, T, C_in] -> [B, T', C_out]``; kernel ``[K, C_in, C_out]``.

    ``padding`` is ``(left, right)`` zero padding in frames (torch ``Conv1d(padding=p)`` is ``(p, p)``;
    OSUM's causal adapter convs use ``(K - 1, 0)``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: tuple[int, int] = (0, 0), axes: Axes = ("conv_width", "embed", "conv_out"),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size
        self.kernel = param(
            torch_linear_init(rngs.params(), (kernel_size, in_channels, out_channels), fan_in, param_dtype), axes)
        self.bias = param(torch_linear_init(rngs.params(), (out_channels,), fan_in, param_dtype), (axes[-1],))
        self.stride = stride
        self.padding = tuple(padding)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # im2col + one matmul instead of lax.conv_general_dilated: same sum up to float32 rounding, but XLA:CPU
        # computes the kernel gradient of a convolution through a strided [C_out, T', B] transposed copy of the
        # output cotangent (tens of ms for Whisper's conv1), while a matmul's gradients are plain matmuls.
        w = self.kernel[...].astype(self.dtype)
        k, c_in, c_out = w.shape
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), self.padding, (0, 0)))
        t_out = (xp.shape[1] - k) // self.stride + 1
        span = self.stride * (t_out - 1) + 1
        cols = jnp.concatenate([xp[:, i:i + span:self.stride] for i in range(k)], axis=-1)  # [B, T', K*C_in]
        y = jnp.dot(cols, w.reshape(k * c_in, c_out))
        return y + self.bias[...].astype(self.dtype)


def conv_out_length(length: jax.Array | int, kernel: int, stride: int, pad_total: int):
    """Output length of a 1-D convolution: ``floor((L + pad - K) / stride) + 1``."""
    return (length + pad_total - kernel) // stride + 1
