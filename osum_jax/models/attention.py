"""Attention: masks, the choice of kernel, the fused kernels, and the two layouts they are fed in.

Shapes: queries ``[B, T, N, H]``, keys/values ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention).
A mask is either a boolean array broadcastable to ``[B, N, T, S]`` (True = "may attend"; decoding with a KV
cache uses this form) or a :class:`SequenceMask` (per-position validity plus "causal or not"), the form every
training-time attention uses and the only one the fused kernels accept. Scores and softmax are float32
whatever the input dtype.

Implementations (``model.attention_impl``):

* ``"xla"``: the einsum attention of ``ops.py`` (hand-written backward pass with ``Ops.custom_vjp``, else
  autodiff); any backend; the reference the fused kernels are tested against.
* ``"cudnn"``: cuDNN's fused flash attention through :func:`jax.nn.dot_product_attention` (NVIDIA, bf16/fp16).
* ``"splash"``: the TPU splash-attention Pallas kernel (``jax.experimental.pallas.ops.tpu``), run per device
  under ``shard_map`` when the model's ``Ops`` has a mesh; on CPU it runs in Pallas interpret mode (tests only: slow).
* ``"pallas"``: the Pallas (Triton) flash-attention kernel for NVIDIA GPUs
  (``jax.experimental.pallas.ops.gpu.attention``), per device like splash; grouped-query keys/values are repeated
  to the query heads; on CPU it runs in Pallas interpret mode (tests only).
* ``"auto"`` (the default): on TPU splash for sequences of at least :data:`SPLASH_MIN_LENGTH` positions (after
  rounding up to the kernel's 128-row blocks), the einsum path for shorter ones (a short LLM row of 175 positions
  would run every layer at 256); on NVIDIA GPUs with a bf16/fp16 compute dtype cuDNN when it is
  loadable, else the Pallas kernel (a host that compiles for a GPU target without cuDNN, ``--plan --target
  cuda:...``); the einsum path otherwise (CPU, float32, a dense mask). The platform is ``Ops.platform``: the
  mesh's (so ``osum-train --plan --target tpu:...`` on a CPU host compiles the kernel the pod will run), else
  JAX's default backend.

The fused kernels never materialise the ``[B, N, T, S]`` scores. Rows of padding (queries at invalid
positions) are computed differently by each implementation (the einsum path lets them attend to every valid
key, splash to the other padding positions, cuDNN zeroes them); they are never read by a valid position, so
outputs at valid positions, the loss and every gradient agree.

Two layouts, for splash. Every implementation takes token-major ``[B, T, N, H]`` (what ``x @ W`` reshaped
gives). The splash kernel works on heads-major ``[B, N, T, H]``; fed token-major it transposes q, k, v and the
output around every call. So where a stack runs splash (:func:`heads_major`), its projections emit and read
the heads-major layout themselves (``Linear.to_heads/from_heads``, ``LoRALinear.to_heads/from_heads``: einsums
whose transposes fold into the matmuls; RoPE rotates that layout) and :func:`dot_product_attention` is called
with ``heads_major=True``. Every other implementation, and decoding with a KV cache, stays token-major.

Padding to the kernels' 128-row blocks (:func:`sequence_multiple`). A stack that runs a fused kernel pads its
sequence once, before its first layer, when that costs at most :data:`STACK_PAD_MAX` of its length; otherwise every
matmul of every layer would pay for the padding, and each attention call pads its own q/k/v and slices its output
instead. Measured on the 4-layer v5p proxy (TPU cost model, 4 x 29 s utterances per chip): padding once per stack
(encoder 1450 -> 1536 positions, LLM 628 -> 640) 96.4 -> 92.3 ms, then heads-major projections 92.3 -> 89.2 ms
(-3.4 %; encoder -> 91.1, Qwen2 -> 89.2); the encoder's q/k/v token-major again measured worse later (75.0 -> 76.3
ms). Same values and gradients as the token-major path (``tests/test_kernels.py``, ``tests/test_attention_impl.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .ops import Ops

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "pallas")

# ``auto`` on TPU: the shortest sequence (rounded up to 128) that runs the splash kernel. Below it the einsum path
# runs the stack unpadded. TPU cost model, v5p x 16, OSUM's recipe buckets (docs/benchmarks.md): the 487-frame
# bucket (LLM rows of 175 positions, padded to 256 for splash) 772 ms with splash, 644 ms with einsum attention;
# the 2900-frame bucket (encoder 1450, LLM 628) 411 ms with splash, 526 ms with einsum attention.
SPLASH_MIN_LENGTH = 512

# The most padding (a fraction of the stack's length) a fused-kernel stack takes on once for all its layers; above
# it each attention call pads q/k/v itself. Full step, TPU cost model, v5p x 16, the recipe's 2340x96 bucket
# (encoder 1170 -> 1280 positions, 9.4 %; LLM rows 454 -> 512, 12.8 %): both stacks padded once 411.7 ms, the
# encoder once and the LLM per call 392.9 ms (MFU 39.8 -> 41.7 %, 53cf8c2), both per call 398.2 ms (72b1b15 with
# an uncommitted threshold switch). Padded once measured better at 5.9 % (encoder, 1450 -> 1536) and 1.9 % (LLM,
# 628 -> 640) on the 4-layer proxy.
STACK_PAD_MAX = 0.10


@dataclasses.dataclass(frozen=True)
class SequenceMask:
    """Self-attention over one sequence: ``valid [B, S]`` bool; ``causal``: query ``i`` sees keys ``j <= i``.

    ``prefix=True`` promises that the valid positions of each row are a prefix (encoders: ``t < length``), which
    lets cuDNN use sequence lengths instead of a mask.
    """

    valid: jax.Array
    causal: bool = False
    prefix: bool = False

    def dense(self) -> jax.Array:
        """The boolean mask of the einsum path: ``[B, 1, 1, S]`` (encoders) or ``[B, 1, S, S]`` (causal)."""
        return causal_padding_mask(self.valid) if self.causal else key_padding_mask(self.valid)


@functools.cache
def cudnn_available() -> bool:
    """True when jax can load cuDNN (a CUDA host with the cuDNN wheels); the fused kernel needs it to compile."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def resolve_impl(impl: str, dtype, head_dim: int, mask, length: int, plat: str | None = None) -> str:
    """The implementation that runs for ``impl`` on platform ``plat`` (default: JAX's default backend) over
    ``length`` positions (``auto`` resolved; dense masks -> ``xla``)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    if not isinstance(mask, SequenceMask) and mask is not None:
        return "xla" if impl in ("auto", "splash", "pallas") else impl
    return impl_for(impl, plat or jax.default_backend(), dtype, head_dim, length)


def impl_for(impl: str, plat: str, dtype, head_dim: int, length: int | None = None) -> str:
    """What ``impl`` means for self-attention over ``length`` positions on platform ``plat`` (``"auto"``
    resolved; ``length=None``: a long sequence)."""
    if impl != "auto":
        return impl
    if plat == "tpu":
        long = length is None or -(-length // _KERNEL_BLOCK) * _KERNEL_BLOCK >= SPLASH_MIN_LENGTH
        return "splash" if long else "xla"
    if plat in ("cuda", "gpu") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
            and head_dim <= 128:
        return "cudnn" if cudnn_available() else "pallas"
    return "xla"


def heads_major(impl: str, dtype, head_dim: int, length: int, plat: str | None = None) -> bool:
    """True when self-attention ``impl`` runs the splash kernel on ``plat`` (default: JAX's default backend) over
    ``length`` positions: the projections then use the heads-major layout (module docstring)."""
    return impl_for(impl, plat or jax.default_backend(), dtype, head_dim, length) == "splash"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: "SequenceMask | jax.Array | None",
                          ops: Ops | None = None, *, heads_major: bool = False) -> jax.Array:
    """Scaled dot-product attention (scale ``1/sqrt(H)``), ``[B, T, N, H]``, or ``[B, N, T, H]`` in and out with
    ``heads_major`` (splash only, see :func:`heads_major`), with ``ops.attention_impl`` on ``ops.platform``
    (default ``Ops()``: ``auto`` on JAX's default backend, no mesh)."""
    ops = ops if ops is not None else Ops()
    impl = resolve_impl(ops.attention_impl, q.dtype, q.shape[-1], mask, q.shape[2 if heads_major else 1],
                        ops.platform)
    if heads_major and impl != "splash":
        raise ValueError(f"heads-major attention runs the splash kernel only, not {impl!r}")
    if impl in ("splash", "pallas"):
        if not isinstance(mask, SequenceMask):
            raise ValueError(f"attention_impl={impl!r} needs a SequenceMask (self-attention), not a dense mask")
        local = functools.partial(_splash_local, heads_major=heads_major) if impl == "splash" else _pallas_gpu_local
        return _per_device_kernel(q, k, v, mask, local, ops, heads_major=heads_major)
    if impl == "cudnn":
        if isinstance(mask, SequenceMask):
            if mask.prefix and not mask.causal:
                lengths = mask.valid.sum(axis=-1).astype(jnp.int32)
                return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                                    key_value_seq_lengths=lengths, implementation="cudnn")
            return jax.nn.dot_product_attention(q, k, v, mask=mask.valid[:, None, None, :], is_causal=mask.causal,
                                                implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if isinstance(mask, SequenceMask):
        mask = mask.dense()
    if mask is None:
        mask = jnp.ones((1, 1, 1, k.shape[1]), bool)
    return ops.attention(q, k, v, mask)


def sequence_multiple(impl: str, dtype, head_dim: int, length: int, plat: str | None = None) -> int:
    """The multiple a stack of ``length`` positions pads its sequence to, once for all its layers, for the
    self-attention ``impl`` (as configured, resolved for ``plat``, default JAX's default backend): 128 where a fused
    kernel runs and that padding is at most :data:`STACK_PAD_MAX` of ``length``, else 1 (the einsum path needs none;
    a fused kernel then pads each call's q/k/v itself). ``auto`` decides on ``length`` rounded up to 128, so the
    padded stack resolves the same way.

    Padding once saves every layer's copies of q/k/v/o into and out of the padded blocks (on the compiled v5p step
    those were real copies); padding per call saves every matmul of every layer from running on the padding."""
    resolved = impl_for(impl, plat or jax.default_backend(), dtype, head_dim, length)
    if resolved not in ("splash", "pallas"):
        return 1
    return _KERNEL_BLOCK if -length % _KERNEL_BLOCK <= STACK_PAD_MAX * length else 1


# -- splash attention (TPU Pallas kernel) -------------------------------------------------------------------------

_KERNEL_BLOCK = 128  # both fused kernels work on sequence blocks of 128 (splash: the TPU lane width)


def _splash_block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    b = _splash_block(length)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q, k, v, valid, *, causal: bool, interpret: bool, heads_major: bool = False):
    """Per-device splash attention on ``[b, T, n, H]`` (``[b, n, T, H]`` if ``heads_major``), ``T`` a multiple of
    128."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    t_axis, n_axis = (2, 1) if heads_major else (1, 2)
    # built per trace, not cached: the kernel holds its block-mask tables as arrays of the current trace
    kernel = _splash_kernel(q.shape[t_axis], q.shape[n_axis], causal, interpret)
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    # valid positions are segment 1, padding segment 0: a valid query sees exactly the valid keys (and the causal
    # mask); a padding query sees padding keys, so no row is ever fully masked
    seg = valid.astype(jnp.int32)
    to_kernel = (lambda x: x) if heads_major else (lambda x: jnp.swapaxes(x, 0, 1))  # -> the kernel's [n, T, H]

    def one(qb, kb, vb, sb):
        o = kernel(to_kernel(qb * scale), to_kernel(kb), to_kernel(vb), segment_ids=SegmentIds(q=sb, kv=sb))
        return to_kernel(o)

    run = jax.vmap(one)
    if q.dtype in (jnp.bfloat16, jnp.float16):
        run = _default_precision(run)
    return run(q, k, v, seg)


def _default_precision(fn):
    """``fn(q, k, v, seg)`` with its kernels (forward and backward) traced at the default matmul precision.

    Products of 16-bit inputs are exact in the MXU's default pass; a global ``jax_default_matmul_precision =
    highest`` would make Mosaic compile an fp32-contract matmul of bf16 operands, which it refuses. The backward
    kernels are traced when the gradient is taken, hence the custom VJP that sets the precision there too.
    """

    @jax.custom_vjp
    def run(q, k, v, seg):
        with jax.default_matmul_precision("default"):
            return fn(q, k, v, seg)

    def fwd(q, k, v, seg):
        with jax.default_matmul_precision("default"):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, (vjp, seg)

    def bwd(res, g):
        vjp, seg = res
        with jax.default_matmul_precision("default"):
            dq, dk, dv = vjp(g)
        return dq, dk, dv, np.zeros(seg.shape, jax.dtypes.float0)

    run.defvjp(fwd, bwd)
    return run


def _pallas_gpu_local(q, k, v, valid, *, causal: bool, interpret: bool):
    """Per-device Pallas (Triton) flash attention on ``[b, T, n, H]`` with ``T`` a multiple of 128."""
    from jax.experimental.pallas.ops.gpu.attention import mha

    n, kv = q.shape[2], k.shape[2]
    if kv != n:  # the kernel has no grouped-query heads: each key/value head serves n / kv query heads
        k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
    seg = valid.astype(jnp.int32)  # segment ids as for splash: padding attends to padding, never to nothing

    def run(q, k, v, seg):
        return mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal, interpret=interpret)

    if q.dtype in (jnp.bfloat16, jnp.float16):
        run = _default_precision(run)
    return run(q, k, v, seg)


def _per_device_kernel(q: jax.Array, k: jax.Array, v: jax.Array, mask: SequenceMask, local_fn, ops: Ops, *,
                       heads_major: bool = False) -> jax.Array:
    """Run a per-device fused kernel (``local_fn(q, k, v, valid, causal=, interpret=)``) on ``[B, T, N, H]``
    (``[B, N, T, H]`` if ``heads_major``), the sequence padded to a multiple of 128, under ``shard_map`` when
    ``ops`` has a mesh."""
    t_axis, n_axis = (2, 1) if heads_major else (1, 2)
    b, t = q.shape[0], q.shape[t_axis]
    pad = -t % _KERNEL_BLOCK
    valid = mask.valid
    if pad:
        def widen(x, axis):
            return jnp.pad(x, [(0, pad) if i == axis else (0, 0) for i in range(x.ndim)])
        q, k, v, valid = widen(q, t_axis), widen(k, t_axis), widen(v, t_axis), widen(valid, 1)
    interpret = ops.platform == "cpu"
    local = functools.partial(local_fn, causal=mask.causal, interpret=interpret)
    mesh = ops.mesh
    if mesh is not None:
        # a Pallas kernel is per device: run it under shard_map, batch split like the activations, heads split
        # over the mesh axes of act_heads when they divide both query and key/value heads
        batch_axes, head_axes = ops.specs(("act_batch", "act_heads"), (b, (q.shape[n_axis], k.shape[n_axis])))
        dims = (batch_axes, head_axes, None, None) if heads_major else (batch_axes, None, head_axes, None)
        spec = jax.sharding.PartitionSpec(*dims)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(batch_axes)),
                              out_specs=spec, check_vma=False)
    out = local(q, k, v, valid)
    if not pad:
        return out
    return out[:, :, :t] if heads_major else out[:, :t]


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
