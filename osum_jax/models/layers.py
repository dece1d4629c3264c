"""Small building blocks shared by the OSUM modules.

Every parameter is created through :func:`param`, which attaches logical axis names (``out_sharding``
metadata, see :mod:`osum_jax.models.axes`) without sharding eagerly: the trainer maps the logical names to
mesh axes with one rules table. Kernels are stored ``[in, out]`` (Hugging Face torch stores ``[out, in]``).

Parameters live in ``param_dtype``; computation casts them to the module's ``dtype``. Normalisations and
softmaxes are computed in float32 whatever the compute dtype is.

Dropout is explicit: a module applies dropout only when it is given a PRNG key (``dropout_key``), so a
forward pass without a key is deterministic evaluation. There is no hidden train/eval mode to forget
(OSUM's own inference scripts ran with dropout on because they never called ``model.eval()``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from . import kernels

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


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """``(keep [shape] bool, keep probability)``: i.i.d. Bernoulli with drop probability ``round(rate * 2^16) /
    2^16`` (0.1 -> 0.1000061), from 16-bit fields.

    JAX's partitionable threefry spends one hash (64 bits) per drawn element whatever the width asked for, and
    drawing the masks was ~7 % of the full step's TPU cycles; each 32-bit word here feeds two elements (its high
    and low halves), halving the hashes. Odd last dimensions fall back to one word per element. With
    ``train.dropout_rng=hash`` each element hashes its own global index instead (no halves: a pure elementwise
    function of the indices that XLA fuses into the mask's consumer, so the mask is never written to memory)."""
    threshold = min(max(int(round(rate * 65536)), 1), 65535)
    keep_p = 1.0 - threshold / 65536
    if str(jax.random.key_impl(key)) in ("rbg", "unsafe_rbg"):
        # XLA's RngBitGenerator emits 16-bit values directly (no hash per element to share)
        return jax.random.bits(key, shape, jnp.uint16) >= threshold, keep_p
    if kernels.hash_masks_enabled():
        return (_hash_bits(key, shape) >> 16) >= threshold, keep_p
    if shape and shape[-1] % 2 == 0:
        words = jax.random.bits(key, (*shape[:-1], shape[-1] // 2), jnp.uint32)
        halves = jnp.concatenate([words >> 16, words & 0xFFFF], axis=-1)
    else:
        halves = jax.random.bits(key, shape, jnp.uint32) >> 16
    return halves >= threshold, keep_p


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 ``[shape]`` for dropout masks from a counter hash (``train.dropout_rng=hash``).

    ``fmix32(fmix32(row ^ s0) ^ fmix32(col * φ ^ s1))`` with ``(s0, s1)`` drawn from ``key`` by threefry: one
    finaliser per element (the row and column hashes are per row / per column), against threefry's 20 rounds.
    Rows and columns are global indices (iotas), so a sharded mask is computed shard by shard, like JAX's
    partitionable threefry. Not a cryptographic generator; the statistics dropout needs are tested
    (tests/test_kernels.py)."""
    s = jax.random.bits(key, (2,), jnp.uint32)
    row_shape = (*shape[:-1], 1)
    r = jnp.zeros(row_shape, jnp.uint32)
    for axis in range(len(shape) - 1):  # the row-major index of each row, built in the mask's own shape
        r = r * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, row_shape, axis)
    c = jax.lax.broadcasted_iota(jnp.uint32, (1,) * (len(shape) - 1) + (shape[-1],), len(shape) - 1)
    return _fmix32(_fmix32(r ^ s[0]) ^ _fmix32(c * jnp.uint32(0x9E3779B9) ^ s[1]))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep, keep_p = keep_mask(key, rate, x.shape)
    # named, so that rematerialisation can keep the mask (1 byte per element) instead of drawing it again
    keep = checkpoint_name(keep, "dropout_mask")
    return jnp.where(keep, x / keep_p, jnp.zeros_like(x))


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

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def to_heads(self, x: jax.Array, heads: int) -> jax.Array:
        """``[B, T, in] -> [B, N, T, out / N]``: the projection emitted heads-major (same values as ``self(x)``
        reshaped and transposed; the compiler folds the transpose into the matmul)."""
        w = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("btd,dnh->bnth", x.astype(self.dtype), w.reshape(w.shape[0], heads, -1))
        if self.bias is not None:
            b = self.bias[...].astype(self.dtype).reshape(heads, -1)
            y = _add_heads_bias(y, b) if kernels.enabled() else y + b[:, None, :]
        return y

    def from_heads(self, x: jax.Array) -> jax.Array:
        """``[B, N, T, H] -> [B, T, out]``, ``self`` applied to the heads concatenated along features."""
        n, h = x.shape[1], x.shape[3]
        y = jnp.einsum("bnth,nhd->btd", x.astype(self.dtype), self.kernel[...].astype(self.dtype).reshape(n, h, -1))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


@jax.custom_vjp
def _add_heads_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """``y [B, N, T, H] + b [N, H]`` whose bias gradient is a matmul with a ones vector over ``(B, T)``."""
    return y + b[:, None, :]


def _add_heads_bias_fwd(y, b):
    return _add_heads_bias(y, b), None


def _add_heads_bias_bwd(_, dy):
    ones = jnp.ones((dy.shape[0], dy.shape[2]), dy.dtype)
    return dy, jnp.einsum("bnth,bt->nh", dy, ones, preferred_element_type=jnp.float32).astype(dy.dtype)


_add_heads_bias.defvjp(_add_heads_bias_fwd, _add_heads_bias_bwd)


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


# GELU and SiLU with hand-written VJPs that keep only the input as residual. Autodiff of jax.nn.gelu /
# jax.nn.silu keeps several intermediates (erfc, products, sigmoid) per activation, which XLA:CPU writes to and
# reads back from memory in the backward pass; recomputing the derivative from x is cheaper. Forward values are
# jax.nn's own (bit-identical); gradients equal autodiff's up to float32 rounding.


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch ``nn.GELU()`` computes it: ``x * 0.5 * (1 + erf(x / sqrt(2)))``, in float32.

    Equal to ``jax.nn.gelu(x, approximate=False)`` up to float32 rounding; jax.nn writes it with ``erfc``, which
    XLA evaluates as two rational approximations and an exponential per element (for |x| below and above 1,
    then a select), where ``erf`` is one rational approximation: on TPU the encoder's GELU is bound by the
    vector unit, not by memory (docs/benchmarks.md)."""
    return _gelu(x) if kernels.enabled() else _gelu_erf(x)


def _gelu_erf(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * np.float32(math.sqrt(0.5))))).astype(x.dtype)


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    return _gelu_erf(x)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 + 0.5 * jax.lax.erf(x32 * np.float32(math.sqrt(0.5)))
    pdf = jnp.exp(-0.5 * x32 * x32) * np.float32(1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def silu(x: jax.Array) -> jax.Array:
    """SiLU ``x * sigmoid(x)`` == ``jax.nn.silu``."""
    return _silu(x) if kernels.enabled() else jax.nn.silu(x)


@jax.custom_vjp
def _silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)


def _silu_fwd(x):
    return _silu(x), x


def _silu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    sig = jax.nn.sigmoid(x32)
    return ((g.astype(jnp.float32) * sig * (1.0 + x32 * (1.0 - sig))).astype(x.dtype),)


_silu.defvjp(_silu_fwd, _silu_bwd)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "gelu":  # exact erf GELU (torch nn.GELU(), OSUM's New_gelu4npu, HF "gelu")
        return gelu
    if name == "relu":
        return jax.nn.relu
    if name == "silu":
        return silu
    raise ValueError(f"unknown activation {name!r}")


def conv_out_length(length: jax.Array | int, kernel: int, stride: int, pad_total: int):
    """Output length of a 1-D convolution: ``floor((L + pad - K) / stride) + 1``."""
    return (length + pad_total - kernel) // stride + 1


def remat_policy(name: str):
    """Map a config name (``model.remat_policy``) to a ``jax.checkpoint`` policy; None means no remat.

    On top of the named policy:

    - the dropout masks (``dropout_mask``) are saved, except with ``train.dropout_rng=hash``: recomputing threefry
      masks in the backward pass means generating every random bit twice (~6 % of the compiled TPU step's cycles),
      while a hash mask is a few integer ops that XLA fuses into its consumers, cheaper than writing and reading
      a saved mask (4-layer v5p proxy, docs/benchmarks.md);
    - the ``dots_*`` policies save each LoRA projection's output (``lora_out``: ``x W + s (xd A) B``) rather than
      its two dot terms, which they would save separately and add again in the backward pass."""
    cp = jax.checkpoint_policies
    table = {
        "none": None,
        "full": cp.nothing_saveable,
        "nothing_saveable": cp.nothing_saveable,
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
    }
    if name not in table:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(table)}")
    if table[name] is None:
        return None
    names = ["lora_out", "norm_stats"] if name.startswith("dots") else []
    if not kernels.hash_masks_enabled():
        names.append("dropout_mask")
    if not names:
        return table[name]
    return cp.save_from_both_policies(table[name], cp.save_only_these_names(*names))
