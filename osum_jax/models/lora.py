"""LoRA linear layers with peft semantics.

``y = x @ W + b + scaling * (dropout(x) @ A) @ B`` with ``A [in, r]``, ``B [r, out]``, ``scaling = alpha / r``.
Initialisation as peft: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform, a=sqrt(5)), ``B = 0``, so a fresh
adapter leaves the base model unchanged. ``A``/``B`` are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``), so
``nnx.LoRAParam`` selects exactly the adapters and ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` the base.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from . import kernels
from .layers import dropout, param


class LoRALinear(nnx.Module):
    """Linear ``[in, out]`` with an optional low-rank adapter (``rank == 0``: plain linear)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 rank: int, alpha: float, lora_dropout: float, init_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.kernel = param(init_std * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype),
                            axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
        if rank > 0:
            bound = 1.0 / math.sqrt(in_features)
            a = jax.random.uniform(rngs.params(), (in_features, rank), param_dtype, -bound, bound)
            self.lora_a = param(a, (axes[0], "lora_rank"), nnx.LoRAParam)
            self.lora_b = param(jnp.zeros((rank, out_features), param_dtype), ("lora_rank", axes[1]), nnx.LoRAParam)
        else:
            self.lora_a = self.lora_b = None
        self.scaling = alpha / rank if rank > 0 else 0.0
        self.lora_dropout = lora_dropout
        self.dtype = dtype

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """``[B, T, in] -> [B, T, out]``."""
        x = self._input(x)
        if self.lora_a is None:
            y = kernels.output_barrier(jnp.dot(x, self.kernel[...].astype(self.dtype)))
        else:
            xd = dropout(x, self.lora_dropout, dropout_key)
            w, a, b = (p[...].astype(self.dtype) for p in (self.kernel, self.lora_a, self.lora_b))
            if kernels.enabled():
                y = _lora_matmul(x, xd, w, a, b, jnp.asarray(self.scaling, self.dtype))
            else:
                y = jnp.dot(x, w) + jnp.dot(jnp.dot(xd, a), b) * jnp.asarray(self.scaling, self.dtype)
            y = checkpoint_name(y, "lora_out")
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def to_heads(self, x: jax.Array, heads: int, dropout_key: jax.Array | None = None) -> jax.Array:
        """``[B, T, in] -> [B, N, T, out / N]``: ``self(x)`` emitted heads-major, the transpose folded into the
        matmuls (for the splash kernel, see ``attention.heads_major``)."""
        x = self._input(x)
        w, a, b = self._split(heads, out=True)
        y = self._einsum(("btd", "dnh", "dr", "btr", "rnh", "bnth"), x, w, a, b, dropout_key)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype).reshape(heads, 1, -1)
        return y

    def from_heads(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """``[B, N, T, H] -> [B, T, out]``: ``self`` applied to the heads concatenated along features (the
        dropout mask drawn in the heads-major shape)."""
        x = self._input(x)
        w, a, b = self._split(x.shape[1], out=False)
        y = self._einsum(("bnth", "nhd", "nhr", "btr", "rd", "btd"), x, w, a, b, dropout_key)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def _input(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if kernels.barriers_enabled():
            # XLA:TPU would fuse the elementwise producer of x (RMSNorm, silu(gate) * up) into the matmul and
            # recompute it per output tile; written once instead (models/kernels.py, model.matmul_barrier)
            x = jax.lax.optimization_barrier(x)
        return x

    def _split(self, heads: int, *, out: bool):
        """The kernel (and adapters) with the ``out`` (or ``in``) features split into ``[heads, head_dim]``."""
        w = self.kernel[...].astype(self.dtype)
        w = w.reshape(w.shape[0], heads, -1) if out else w.reshape(heads, -1, w.shape[1])
        if self.lora_a is None:
            return w, None, None
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        if out:
            return w, a, b.reshape(b.shape[0], heads, -1)
        return w, a.reshape(heads, -1, a.shape[1]), b

    def _einsum(self, subs, x, w, a, b, dropout_key):
        xs, ws, as_, lows, bs, ys = subs
        if a is None:
            return kernels.output_barrier(jnp.einsum(f"{xs},{ws}->{ys}", x, w))
        xd = dropout(x, self.lora_dropout, dropout_key)
        scaling = jnp.asarray(self.scaling, self.dtype)
        if kernels.enabled():
            y = _lora_einsum(subs, x, xd, w, a, b, scaling)
        else:
            y = _lora_einsum_fwd(subs, x, xd, w, a, b, scaling)[0]
        return checkpoint_name(y, "lora_out")

    def merge_(self) -> None:
        """Fold the adapter into the base kernel in place (``W += scaling * A @ B``; then ``B = 0``).

        Works on stacked layers too (leading ``layers`` axis). Computed in float32.
        """
        if self.lora_a is None:
            return
        w = self.kernel[...]
        delta = jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
        self.kernel[...] = (w.astype(jnp.float32) + self.scaling * delta).astype(w.dtype)
        self.lora_b[...] = jnp.zeros_like(self.lora_b[...])


def merge_lora_(model: nnx.Module) -> int:
    """Merge every LoRA adapter of ``model`` into its base weights in place; returns how many were merged."""
    n = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear) and node.lora_a is not None:
            node.merge_()
            n += 1
    return n


# ``x @ W + scaling * (xd @ A) @ B`` with a hand-written VJP over the flattened token axis. Autodiff gives the
# same products, but XLA:CPU lays the cotangent of ``B`` out as a transposed [out, tokens] copy of the output
# cotangent (for the MLP gate projection: a strided 2752 x 828 float32 transpose per layer that took longer than
# the projection's own matmuls); here every product is an explicit 2-D matmul and no such copy is made.


@jax.custom_vjp
def _lora_matmul(x, xd, w, a, b, scaling):
    low = jnp.dot(xd, a)
    return jnp.dot(x, w) + jnp.dot(low, b) * scaling


def _lora_matmul_fwd(x, xd, w, a, b, scaling):
    low = jnp.dot(xd, a)
    return jnp.dot(x, w) + jnp.dot(low, b) * scaling, (x, xd, w, a, b, scaling, low)


def _lora_matmul_bwd(res, dy):
    x, xd, w, a, b, scaling, low = res
    dy = kernels.cotangent(dy)
    n_in, n_out = w.shape
    dy2 = dy.reshape(-1, n_out)
    x2, xd2, low2 = x.reshape(-1, n_in), xd.reshape(-1, n_in), low.reshape(-1, low.shape[-1])
    dys = dy2 * scaling
    dlow = jnp.dot(dys, b.T)                        # [tokens, r]
    dx = jnp.dot(dy2, w.T).reshape(x.shape)
    dxd = jnp.dot(dlow, a.T).reshape(xd.shape)
    dw = jnp.dot(x2.T, dy2)                         # dead code (removed by XLA) when the base kernel is frozen
    da = jnp.dot(xd2.T, dlow)
    db = jnp.dot(low2.T, dys)
    dscale = jnp.sum(jnp.dot(low2, b) * dy2).astype(scaling.dtype)
    return dx, dxd, dw, da, db, dscale


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


# The same products for any einsum subscripts ``(x, W, A, low, B, y)``: ``y = x W + scaling (xd A) B``. Used for
# projections emitted (or read) heads-major, where a 2-D matmul would need a transpose around it.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_einsum(subs, x, xd, w, a, b, scaling):
    return _lora_einsum_fwd(subs, x, xd, w, a, b, scaling)[0]


def _lora_einsum_fwd(subs, x, xd, w, a, b, scaling):
    xs, ws, as_, lows, bs, ys = subs
    low = jnp.einsum(f"{xs},{as_}->{lows}", xd, a)
    y = jnp.einsum(f"{xs},{ws}->{ys}", x, w) + jnp.einsum(f"{lows},{bs}->{ys}", low, b) * scaling
    return y, (x, xd, w, a, b, scaling, low)


def _lora_einsum_bwd(subs, res, dy):
    xs, ws, as_, lows, bs, ys = subs
    x, xd, w, a, b, scaling, low = res
    dy = kernels.cotangent(dy)
    dys = dy * scaling
    dlow = jnp.einsum(f"{ys},{bs}->{lows}", dys, b)
    dx = jnp.einsum(f"{ys},{ws}->{xs}", dy, w)
    dxd = jnp.einsum(f"{lows},{as_}->{xs}", dlow, a)
    dw = jnp.einsum(f"{xs},{ys}->{ws}", x, dy)  # dead code (removed by XLA) when the base kernel is frozen
    da = jnp.einsum(f"{xs},{lows}->{as_}", xd, dlow)
    db = jnp.einsum(f"{lows},{ys}->{bs}", low, dys)
    dscale = jnp.sum(jnp.einsum(f"{lows},{bs}->{ys}", low, b) * dy).astype(scaling.dtype)
    return dx, dxd, dw, da, db, dscale


_lora_einsum.defvjp(_lora_einsum_fwd, _lora_einsum_bwd)
