"""LoRA linear layers with peft semantics.

``y = x @ W + b + scaling * (dropout(x) @ A) @ B`` with ``A [in, r]``, ``B [r, out]``, ``scaling = alpha / r``.
Initialisation as peft: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform, a=sqrt(5)), ``B = 0``, so a fresh
adapter leaves the base model unchanged. ``A``/``B`` are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``), so
``nnx.LoRAParam`` selects exactly the adapters and ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` the base.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .layers import param
from .ops import Ops


class LoRALinear(nnx.Module):
    """Linear ``[in, out]`` with an optional low-rank adapter (``rank == 0``: plain linear)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 rank: int, alpha: float, lora_dropout: float, init_std: float, dtype, param_dtype,
                 ops: Ops | None = None, rngs: nnx.Rngs):
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
        self.ops = ops if ops is not None else Ops()

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """``[B, T, in] -> [B, T, out]``."""
        x = self._input(x)
        if self.lora_a is None:
            y = self.ops.output_barrier(jnp.dot(x, self.kernel[...].astype(self.dtype)))
        else:
            xd = self.ops.dropout(x, self.lora_dropout, dropout_key)
            w, a, b = (p[...].astype(self.dtype) for p in (self.kernel, self.lora_a, self.lora_b))
            y = checkpoint_name(self.ops.lora_matmul(x, xd, w, a, b, jnp.asarray(self.scaling, self.dtype)),
                                "lora_out")
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def to_heads(self, x: jax.Array, heads: int, dropout_key: jax.Array | None = None) -> jax.Array:
        """``[B, T, in] -> [B, N, T, out / N]``: ``self(x)`` emitted heads-major, the transpose folded into the
        matmuls (for the splash kernel: attention.py's layouts)."""
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
        # with matmul barriers XLA:TPU writes x once instead of fusing its elementwise producer (RMSNorm,
        # silu(gate) * up) into the matmul and recomputing it per output tile (ops.py)
        return self.ops.input_barrier(x.astype(self.dtype))

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
        if a is None:
            xs, ws, ys = subs[0], subs[1], subs[5]
            return self.ops.output_barrier(jnp.einsum(f"{xs},{ws}->{ys}", x, w))
        xd = self.ops.dropout(x, self.lora_dropout, dropout_key)
        y = self.ops.lora_einsum(subs, x, xd, w, a, b, jnp.asarray(self.scaling, self.dtype))
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
