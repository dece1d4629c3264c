"""Which gradient formulas the model traces with: hand-written VJPs or plain autodiff.

GELU, SiLU, the LoRA matmul and the einsum attention each have a hand-written VJP (``layers.py``, ``lora.py``,
``attention.py``) that keeps fewer or smaller residuals; the heads-major bias add's VJP computes the bias gradient
as a matmul with ones (XLA:TPU made a slow standalone reduce of it). They are selected per backend
(``model.custom_vjp``), by measurement: faster on XLA:CPU (wall clock, ``scripts/bench_model.py``) and on TPU
(the v5p compiler's cost model: 32.0 vs 33.5 ms for a 4-layer proxy of the full step, docs/benchmarks.md), so
``auto`` uses them there;
on GPU, where no cost model or device has measured them yet, ``auto`` uses plain autodiff. Forward values are
identical either way and gradients agree up to float32 rounding (tested).

The choice is made while tracing: ``with custom_vjps(False): jax.jit(step).lower(...)``. Outside such a context
the hand-written VJPs are used (the behaviour of every test and of CPU training).

Matmul input barriers (``model.matmul_barrier``) are chosen the same way: XLA:TPU fuses the elementwise work that
produces a matmul's input (RMSNorm, ``silu(gate) * up``, the dropout select) into the matmul itself and recomputes
it for every tile of the output, which the v5p compiler's cost model puts at 42-69 % of the MXU's rate for the
LLM projections instead of 85-92 %. An ``optimization_barrier`` on a projection's input makes XLA write that input
once and feed the matmul from memory (and, by the barrier's transpose, the same for the input's gradient in the
backward pass). The same holds in the backward pass for the output cotangents the transposed matmuls read (for the
MLP: ``dh * silu(gate)`` and ``dh * up * silu'(gate)``, 61-70 % of the MXU's rate when fused), so with barriers on,
every LLM projection's output cotangent is written once too (``lora.py``), and the encoder's fc2 reads its input
(GELU, dropout) from memory. ``auto`` uses them on TPU, where the cost model measured them (docs/benchmarks.md);
XLA:GPU's library GEMMs do not fuse their operands anyway, and on CPU they only add copies. Values are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("osum_custom_vjp", default=True)
_BARRIERS: contextvars.ContextVar[bool] = contextvars.ContextVar("osum_matmul_barrier", default=False)
_HASH_MASKS: contextvars.ContextVar[bool] = contextvars.ContextVar("osum_hash_masks", default=False)


def _switch(var: contextvars.ContextVar[bool]):
    """A context manager that sets ``var`` while a step is traced."""

    @contextlib.contextmanager
    def use(enabled: bool) -> Iterator[None]:
        token = var.set(bool(enabled))
        try:
            yield
        finally:
            var.reset(token)

    return use


custom_vjps = _switch(_ENABLED)
matmul_barriers = _switch(_BARRIERS)
hash_masks = _switch(_HASH_MASKS)


def enabled() -> bool:
    return _ENABLED.get()


def barriers_enabled() -> bool:
    return _BARRIERS.get()


def hash_masks_enabled() -> bool:
    return _HASH_MASKS.get()


def resolve(setting: str, platform: str) -> bool:
    """``model.custom_vjp`` for a mesh of ``platform`` devices -> use the hand-written VJPs?"""
    return setting == "always" or (setting == "auto" and platform in ("cpu", "tpu"))


def resolve_barrier(setting: str, platform: str) -> bool:
    """``model.matmul_barrier`` for a mesh of ``platform`` devices -> put barriers on matmul inputs?"""
    return setting == "always" or (setting == "auto" and platform == "tpu")


def output_barrier(y: jax.Array) -> jax.Array:
    """A projection's (or a norm's) output; with matmul barriers, its cotangent is written once before its
    consumer reads it: the transposed matmul (see :func:`cotangent`), or the norm's backward, whose reductions
    XLA:TPU would otherwise fuse into the matmul producing that cotangent. Identity in value and gradient."""
    return _cotangent_barrier(y) if barriers_enabled() else y


@jax.custom_vjp
def _cotangent_barrier(y):
    return y


def _cotangent_barrier_fwd(y):
    return y, None


def _cotangent_barrier_bwd(_, dy):
    return (jax.lax.optimization_barrier(dy),)


_cotangent_barrier.defvjp(_cotangent_barrier_fwd, _cotangent_barrier_bwd)


def cotangent(dy: jax.Array) -> jax.Array:
    """An output cotangent as a hand-written VJP's matmuls read it. With matmul barriers (TPU): written once, so
    that XLA does not fuse its elementwise producer (for the MLP: ``dh * silu(gate)``, ``dh * up * silu'(gate)``)
    into the transposed matmul and recompute it per output tile (61-70 % of the MXU's rate instead of 87-92 %)."""
    return jax.lax.optimization_barrier(dy) if barriers_enabled() else dy
