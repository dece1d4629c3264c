"""The model's backend choices in one place: the :class:`Ops` every module is built with, and each hand-written
VJP, barrier and tuned formula beside the plain form it stands in for.

The model files are plain Flax. A module receives an ``Ops`` as a constructor argument (as MaxText's
``AttentionOp`` receives the config, the mesh and ``attention_kernel``) and calls it: ``self.ops.gelu(x)``,
``self.ops.dropout(x, rate, key)``, ``self.ops.constrain(x, names)``. Nothing is read from ambient state. An
``Ops`` is a frozen, hashable value; it sits in the modules' graph definition, so a model built with other
choices is another graph (``nnx.merge`` the same state into it to compare them, as ``tests/test_kernels.py``
does).

``Ops.from_config(model_cfg, mesh=..., activation_rules=..., dropout_rng=...)`` resolves the settings once, for
the platform of ``mesh`` (so ``osum-train --plan --target tpu:...`` on a CPU host builds what the pod runs), else
for JAX's default backend. ``Ops()`` is the default backend's ``auto`` choices with no mesh: what tests,
conversion and inference get when they build a module without one.

==================  ==========================  =====================  ============================================
switch              from                        ``auto``               selects
==================  ==========================  =====================  ============================================
``custom_vjp``      ``model.custom_vjp``        CPU and TPU            the hand-written forms below; off: autodiff
                                                                       of the plain forms beside them (the GPU path)
``matmul_barrier``  ``model.matmul_barrier``    TPU                    ``optimization_barrier`` on matmul inputs
                                                                       and on the output cotangents they produce
``hash_masks``      ``train.dropout_rng=hash``  (threefry)             dropout masks from a counter hash
``scan_unroll``     ``model.scan_unroll``       TPU: 0, else 1         layers per layer-scan iteration (``stack.py``;
                                                                       decoding resolves ``auto`` to 1)
``attention_impl``  ``model.attention_impl``    per platform, length   the attention kernel (``attention.py``)
``mesh``, rules     ``train.mesh``              none                   activation sharding constraints
==================  ==========================  =====================  ============================================

Hand-written forms (``custom_vjp``), each with its plain reference here, same forward values (up to float32
rounding) and gradients (tested: ``tests/test_kernels.py`` runs the model and each form both ways):

* VJPs that keep fewer or smaller residuals, tuned on XLA:CPU (wall clock) and preferred by the v5p cost model
  (4-layer proxy of the full step, 32.0 ms against 33.5 ms for autodiff): GELU, SiLU, the LoRA matmul (2-D over
  tokens) and einsum (heads-major), the einsum attention.
* Two rewrites the TPU cost model alone chose, each under 2 % of the proxy step and never confirmed on
  hardware, kept behind this switch (so GPUs run the plain forms): the heads-major bias gradient as a matmul
  with ones (74.7 -> 74.5 ms), RoPE's ``rotate_half`` as a signed-permutation matmul on the heads-major layout
  (74.5 -> 73.6 ms). GELU is torch's ``erf`` formula on every path (the plain form, and the parity reference):
  jax.nn's ``erfc`` form measured worse on TPU (77.7 -> 78.6 ms) and on the 8 x H100 roofline bounds (223.8 ->
  227.6 ms). docs/training.md ("Backend choices") records each decision.

Matmul barriers (``matmul_barrier``): XLA:TPU fuses the elementwise work that produces a matmul's input (RMSNorm,
``silu(gate) * up``, the dropout select) into the matmul and recomputes it for every output tile (42-69 % of the
MXU's rate for the LLM projections instead of 85-92 %, v5p cost model). A barrier makes XLA write that input
once; in the backward pass the same holds for the output cotangent a transposed matmul reads (for the MLP's
``up_proj``: ``dh * silu(gate)``, 61 % of the MXU's rate when fused), so the output cotangent of each projection
without an adapter (OSUM: ``up_proj``) and of each encoder LayerNorm is written once too (:meth:`Ops.output_barrier`),
and the encoder's fc2 reads its input (GELU, dropout) from memory. Proxy 101.2 -> 96.4 ms for the input barriers
alone; XLA:GPU's library GEMMs do not fuse their operands and on CPU barriers only add copies, hence TPU only.
Values are unchanged. The LoRA VJPs write no barrier on their cotangent: one was there, read from the old
ContextVar in the backward pass, which the trainer had already left, so it never reached a compiled step; made
explicit it measured worse (full step, v5p x 16, 2900 x 200 bucket, 24 per chip: 412.4 -> 424.8 ms) and went.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from . import sharding

if TYPE_CHECKING:
    from ..config import ModelConfig

SETTINGS = ("auto", "always", "never")


def resolve_custom_vjp(setting: str, platform: str) -> bool:
    """``model.custom_vjp`` for ``platform`` devices -> use the hand-written forms?"""
    return setting == "always" or (setting == "auto" and platform in ("cpu", "tpu"))


def resolve_barrier(setting: str, platform: str) -> bool:
    """``model.matmul_barrier`` for ``platform`` devices -> put barriers on matmul inputs and cotangents?"""
    return setting == "always" or (setting == "auto" and platform == "tpu")


def resolve_scan_unroll(setting: int | str, platform: str) -> int:
    """``model.scan_unroll`` for ``platform`` devices -> layers per layer-scan iteration (0 = every layer)."""
    if setting == "auto":
        return 0 if platform == "tpu" else 1
    return int(setting)


def mesh_platform(mesh: jax.sharding.Mesh | None) -> str:
    """The platform a model is compiled for: ``mesh``'s devices, else JAX's default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


@dataclasses.dataclass(frozen=True)
class Ops:
    """The backend choices a model is built with (see the module docstring). ``None`` switches take the
    platform's ``auto`` value; ``platform`` defaults to ``mesh``'s, else JAX's default backend."""

    custom_vjp: bool | None = None
    matmul_barrier: bool | None = None
    hash_masks: bool = False
    attention_impl: str = "auto"
    mesh: jax.sharding.Mesh | None = None
    activation_rules: tuple[tuple[str, str | None], ...] = ()
    platform: str = ""
    scan_unroll: int = 1  # layers per layer-scan iteration, 0 = all (``model.scan_unroll``)

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        plat = self.platform or mesh_platform(self.mesh)
        put("platform", plat)
        if self.custom_vjp is None:
            put("custom_vjp", resolve_custom_vjp("auto", plat))
        if self.matmul_barrier is None:
            put("matmul_barrier", resolve_barrier("auto", plat))
        put("activation_rules", tuple(tuple(r) for r in self.activation_rules))

    @classmethod
    def from_config(cls, model: "ModelConfig", *, mesh: jax.sharding.Mesh | None = None,
                    activation_rules: Sequence[Sequence[str | None]] = (), dropout_rng: str = "") -> "Ops":
        """The choices of ``model`` (``model.custom_vjp``, ``matmul_barrier``, ``attention_impl``) and
        ``train.dropout_rng`` resolved for ``mesh``'s platform; activations pinned on ``mesh`` by
        ``activation_rules`` (``train.mesh.activation_rules``)."""
        plat = mesh_platform(mesh)
        return cls(custom_vjp=resolve_custom_vjp(model.custom_vjp, plat),
                   matmul_barrier=resolve_barrier(model.matmul_barrier, plat), hash_masks=dropout_rng == "hash",
                   attention_impl=model.attention_impl, mesh=mesh, activation_rules=tuple(activation_rules),
                   platform=plat, scan_unroll=resolve_scan_unroll(model.scan_unroll, plat))

    # -- activation sharding (sharding.py) ------------------------------------------------------------------------

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        """``x`` pinned to the mesh axes of its logical ``names``; the identity without a mesh."""
        return x if self.mesh is None else sharding.constrain(x, names, self.mesh, self.activation_rules)

    def specs(self, names: Sequence[str], sizes: Sequence[int | tuple[int, ...]]) -> tuple:
        """Mesh axes of each logical name for dimensions of ``sizes`` (``shard_map`` specs of per-device kernels);
        ``None`` each without a mesh."""
        if self.mesh is None:
            return (None,) * len(names)
        return sharding.activation_specs(names, sizes, self.mesh, self.activation_rules)

    # -- barriers -------------------------------------------------------------------------------------------------

    def input_barrier(self, x: jax.Array) -> jax.Array:
        """A matmul's input, written once before the matmul reads it (with matmul barriers)."""
        return jax.lax.optimization_barrier(x) if self.matmul_barrier else x

    def output_barrier(self, y: jax.Array) -> jax.Array:
        """A projection's (or a norm's) output whose cotangent is written once before its consumer reads it (with
        matmul barriers): the transposed matmul, or the norm's backward, whose reductions XLA:TPU would otherwise
        fuse into the matmul producing that cotangent. Identity in value and gradient."""
        return _cotangent_barrier(y) if self.matmul_barrier else y

    # -- activations ----------------------------------------------------------------------------------------------

    def gelu(self, x: jax.Array) -> jax.Array:
        """Exact GELU (torch ``nn.GELU()``), computed in float32."""
        return _gelu(x) if self.custom_vjp else gelu(x)

    def silu(self, x: jax.Array) -> jax.Array:
        """SiLU ``x * sigmoid(x)``."""
        return _silu(x) if self.custom_vjp else jax.nn.silu(x)

    def activation(self, name: str) -> Callable[[jax.Array], jax.Array]:
        if name == "gelu":  # exact erf GELU (torch nn.GELU(), OSUM's New_gelu4npu, HF "gelu")
            return self.gelu
        if name == "relu":
            return jax.nn.relu
        if name == "silu":
            return self.silu
        raise ValueError(f"unknown activation {name!r}")

    # -- dropout and remat ----------------------------------------------------------------------------------------

    def keep_mask(self, key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
        return keep_mask(key, rate, shape, hash_masks=self.hash_masks)

    def dropout(self, x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
        return dropout(x, rate, key, hash_masks=self.hash_masks)

    def remat_policy(self, name: str):
        return remat_policy(name, hash_masks=self.hash_masks)

    # -- LoRA, heads-major projections, RoPE, attention -----------------------------------------------------------

    def lora_matmul(self, x, xd, w, a, b, scaling) -> jax.Array:
        """``x W + scaling (xd A) B`` over ``[..., in]``."""
        if self.custom_vjp:
            return _lora_matmul(x, xd, w, a, b, scaling)
        return lora_matmul(x, xd, w, a, b, scaling)

    def lora_einsum(self, subs: tuple[str, ...], x, xd, w, a, b, scaling) -> jax.Array:
        """``x W + scaling (xd A) B`` for einsum subscripts ``subs = (x, W, A, low, B, y)``."""
        if self.custom_vjp:
            return _lora_einsum(subs, x, xd, w, a, b, scaling)
        return _lora_einsum_fwd(subs, x, xd, w, a, b, scaling)[0]

    def add_heads_bias(self, y: jax.Array, b: jax.Array) -> jax.Array:
        """``y [B, N, T, H] + b [N, H]``."""
        return _add_heads_bias(y, b) if self.custom_vjp else y + b[:, None, :]

    def rotate_half(self, x: jax.Array, *, heads_major: bool = False) -> jax.Array:
        """HF's ``rotate_half``; on the heads-major layout with the hand-written forms, as a matmul."""
        return rotate_half_matmul(x) if heads_major and self.custom_vjp else rotate_half(x)

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """The einsum attention, ``[B, T, N, H]``, ``mask`` boolean broadcastable to ``[B, N, T, S]``."""
        return _attention(q, k, v, mask) if self.custom_vjp else attention(q, k, v, mask)[0]


# -- barriers ------------------------------------------------------------------------------------------------------


@jax.custom_vjp
def _cotangent_barrier(y):
    return y


def _cotangent_barrier_fwd(y):
    return y, None


def _cotangent_barrier_bwd(_, dy):
    return (jax.lax.optimization_barrier(dy),)


_cotangent_barrier.defvjp(_cotangent_barrier_fwd, _cotangent_barrier_bwd)


# -- GELU and SiLU -------------------------------------------------------------------------------------------------
# The hand-written VJPs keep only the input as residual. Autodiff of GELU / jax.nn.silu keeps several
# intermediates (erf, products, sigmoid) per activation, which XLA:CPU writes to and reads back from memory in
# the backward pass; recomputing the derivative from x is cheaper.


def gelu(x: jax.Array) -> jax.Array:
    """Reference: exact GELU as torch writes it, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, in float32. ``erf`` is one
    rational approximation per element, where XLA evaluates jax.nn's ``erfc`` form as two and an exponential (for
    |x| below and above 1, then a select); on TPU the encoder's GELU is bound by the vector unit
    (docs/benchmarks.md)."""
    x32 = x.astype(jnp.float32)
    return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * np.float32(math.sqrt(0.5))))).astype(x.dtype)


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    return gelu(x)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 + 0.5 * jax.lax.erf(x32 * np.float32(math.sqrt(0.5)))
    pdf = jnp.exp(-0.5 * x32 * x32) * np.float32(1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


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


# -- dropout masks -------------------------------------------------------------------------------------------------


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...], *,
              hash_masks: bool = False) -> tuple[jax.Array, float]:
    """``(keep [shape] bool, keep probability)``: i.i.d. Bernoulli with drop probability ``round(rate * 2^16) /
    2^16`` (0.1 -> 0.1000061), from 16-bit fields.

    JAX's partitionable threefry spends one hash (64 bits) per drawn element whatever the width asked for, and
    drawing the masks was ~7 % of the full step's TPU cycles; each 32-bit word here feeds two elements (its high
    and low halves), halving the hashes. Odd last dimensions fall back to one word per element. With
    ``hash_masks`` (``train.dropout_rng=hash``) each element hashes its own global index instead (no halves: a
    pure elementwise function of the indices that XLA fuses into the mask's consumer, so the mask is never
    written to memory; 4-layer v5p proxy 86.8 -> 80.4 ms, docs/training.md)."""
    threshold = min(max(int(round(rate * 65536)), 1), 65535)
    keep_p = 1.0 - threshold / 65536
    if str(jax.random.key_impl(key)) in ("rbg", "unsafe_rbg"):
        # XLA's RngBitGenerator emits 16-bit values directly (no hash per element to share)
        return jax.random.bits(key, shape, jnp.uint16) >= threshold, keep_p
    if hash_masks:
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


def dropout(x: jax.Array, rate: float, key: jax.Array | None, *, hash_masks: bool = False) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep, keep_p = keep_mask(key, rate, x.shape, hash_masks=hash_masks)
    # named, so that rematerialisation can keep the mask (1 byte per element) instead of drawing it again
    keep = checkpoint_name(keep, "dropout_mask")
    return jnp.where(keep, x / keep_p, jnp.zeros_like(x))


def remat_policy(name: str, *, hash_masks: bool = False):
    """Map a config name (``model.remat_policy``) to a ``jax.checkpoint`` policy; None means no remat.

    On top of the named policy:

    - the dropout masks (``dropout_mask``) are saved, except with ``hash_masks``: recomputing threefry masks in
      the backward pass means generating every random bit twice (~6 % of the compiled TPU step's cycles), while
      a hash mask is a few integer ops that XLA fuses into its consumers, cheaper than writing and reading a
      saved mask (4-layer v5p proxy, docs/benchmarks.md);
    - the ``dots_*`` policies save each LoRA projection's output (``lora_out``: ``x W + s (xd A) B``) rather than
      its two dot terms, which they would save separately and add again in the backward pass, and each norm's
      per-row statistics (``norm_stats``)."""
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
    if not hash_masks:
        names.append("dropout_mask")
    if not names:
        return table[name]
    return cp.save_from_both_policies(table[name], cp.save_only_these_names(*names))


# -- LoRA ----------------------------------------------------------------------------------------------------------
# ``x @ W + scaling * (xd @ A) @ B`` with a hand-written VJP over the flattened token axis. Autodiff gives the
# same products, but XLA:CPU lays the cotangent of ``B`` out as a transposed [out, tokens] copy of the output
# cotangent (for the MLP gate projection: a strided 2752 x 828 float32 transpose per layer that took longer than
# the projection's own matmuls); here every product is an explicit 2-D matmul and no such copy is made.


def lora_matmul(x, xd, w, a, b, scaling):
    """Reference: ``x W + scaling (xd A) B``."""
    return jnp.dot(x, w) + jnp.dot(jnp.dot(xd, a), b) * scaling


@jax.custom_vjp
def _lora_matmul(x, xd, w, a, b, scaling):
    return lora_matmul(x, xd, w, a, b, scaling)


def _lora_matmul_fwd(x, xd, w, a, b, scaling):
    low = jnp.dot(xd, a)
    return jnp.dot(x, w) + jnp.dot(low, b) * scaling, (x, xd, w, a, b, scaling, low)


def _lora_matmul_bwd(res, dy):
    x, xd, w, a, b, scaling, low = res
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
# projections emitted (or read) heads-major, where a 2-D matmul would need a transpose around it. The reference is
# autodiff of ``_lora_einsum_fwd``'s output.


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


# -- heads-major bias and RoPE rotation (the splash layout, attention.py) -----------------------------------------


@jax.custom_vjp
def _add_heads_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """``y [B, N, T, H] + b [N, H]`` whose bias gradient is a matmul with a ones vector over ``(B, T)`` (float32
    accumulation), not a standalone reduce over ``[B, N, T, H]``, which XLA:TPU made slow."""
    return y + b[:, None, :]


def _add_heads_bias_fwd(y, b):
    return _add_heads_bias(y, b), None


def _add_heads_bias_bwd(_, dy):
    ones = jnp.ones((dy.shape[0], dy.shape[2]), dy.dtype)
    return dy, jnp.einsum("bnth,bt->nh", dy, ones, preferred_element_type=jnp.float32).astype(dy.dtype)


_add_heads_bias.defvjp(_add_heads_bias_fwd, _add_heads_bias_bwd)


def rotate_half(x: jax.Array) -> jax.Array:
    """Reference: ``concatenate([-x[..., H/2:], x[..., :H/2]])`` (HF Qwen2/LLaMA)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@functools.lru_cache(maxsize=None)
def _rotate_half_matrix(h: int) -> np.ndarray:
    """``R [H, H]`` with ``x @ R == rotate_half(x)``."""
    half = h // 2
    r = np.zeros((h, h), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def rotate_half_matmul(x: jax.Array) -> jax.Array:
    """``rotate_half`` as a matmul with its signed permutation matrix: on the MXU and fused with the rest of the
    rotation, where the slices and concatenation of ``[..., 64]``-wide halves cost XLA:TPU separate passes over
    half-empty vector lanes. Exact: one +-1 term per output."""
    return jnp.einsum("...h,hg->...g", x, jnp.asarray(_rotate_half_matrix(x.shape[-1]), x.dtype),
                      precision=jax.lax.Precision.HIGHEST)


# -- the einsum attention ------------------------------------------------------------------------------------------
# Same numerics as jax.nn.dot_product_attention(implementation="xla") up to float32 rounding. The reference is
# autodiff of :func:`attention`. Autodiff of the softmax makes XLA:CPU keep two [B, N, T, S] tensors per layer and
# run a [B, N, T, S] reduction plus broadcasts/selects in the backward pass; in the hand-written VJP the only
# residual of that size is the probabilities, the row term of the softmax backward is ``sum_h dO * O`` (a
# [B, N, T, H] reduction, the FlashAttention identity), and the mask enters as an additive bias of shape
# [B, 1, 1|T, S] (masked scores become the same -0.7 * f32max as jax's ``where``; their gradient is p * (...) = 0).
# Grouped-query heads are handled by a [K, G] head split instead of repeating keys/values.

# what jax.nn.dot_product_attention puts at masked scores: finite, so a fully masked row is uniform, not NaN
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def _mask_bias(mask: jax.Array, kv: int, groups: int) -> jax.Array:
    """Boolean mask broadcastable to ``[B, N, T, S]`` -> float32 bias broadcastable to ``[B, K, G, T, S]``."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mn, mt, ms = mask.shape
    mask = mask[:, :, None] if mn == 1 else mask.reshape(mb, kv, groups, mt, ms)
    return jnp.where(mask, jnp.float32(0.0), jnp.float32(_MASKED))


def _split_heads(x: jax.Array, kv: int) -> jax.Array:
    b, t, n, h = x.shape
    return x.reshape(b, t, kv, n // kv, h)


def attention(q, k, v, mask) -> tuple[jax.Array, jax.Array]:
    """Reference: scaled dot-product attention ``[B, T, N, H]`` and its probabilities ``[B, K, G, T, S]``."""
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
    return attention(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    o, p = attention(q, k, v, mask)
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
