"""Every attention implementation that runs on CPU agrees with the einsum path (models/attention.py).

The TPU splash kernel and the GPU Pallas (Triton) flash-attention kernel run here in Pallas interpret mode: the
same kernel code (blocking, segment ids, online softmax, their own backward kernels) executed by the CPU, so
their numerics are checked without a TPU or GPU. Outputs are
compared at valid query positions only: padding rows are computed differently by design and never read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osum_jax.models import OSUM, Ops
from osum_jax.models.attention import (SequenceMask, dot_product_attention, heads_major, resolve_impl,
                                       sequence_multiple)
from osum_jax.train.mesh import build_mesh
from osum_jax.config import MeshConfig, DEFAULT_ACTIVATION_RULES
from tests.helpers import assert_same_loss_and_grads, tiny_model_config


def _qkv(rng, b, t, n, k, h):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return f(b, t, n, h), f(b, t, k, h), f(b, t, k, h)


@pytest.mark.parametrize("kernel", ["splash", "pallas"])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_kernel_equals_einsum_with_holes_and_gqa(causal, kernel):
    rng = np.random.default_rng(0)
    b, t, n, k, h = 2, 200, 4, 2, 32  # t is not a multiple of the kernel's 128-lane blocks: padded inside
    q, kk, v = _qkv(rng, b, t, n, k, h)
    valid = np.arange(t)[None] < np.array([[150], [200]])
    valid[1, 20:45] = False  # a hole inside the sequence, as OSUM's packed LLM input has
    mask = SequenceMask(jnp.asarray(valid), causal=causal)
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) * valid[..., None, None]

    def loss(impl):
        return lambda q, kk, v: (dot_product_attention(q, kk, v, mask, Ops(attention_impl=impl)) * w).sum()

    out = {impl: dot_product_attention(q, kk, v, mask, Ops(attention_impl=impl)) for impl in ("xla", kernel)}
    sel = valid[..., None, None]
    np.testing.assert_allclose(np.where(sel, out[kernel], 0), np.where(sel, out["xla"], 0), atol=2e-5, rtol=1e-4)
    grads = {impl: jax.grad(loss(impl), argnums=(0, 1, 2))(q, kk, v) for impl in ("xla", kernel)}
    for a, r in zip(grads[kernel], grads["xla"]):
        assert np.abs(np.asarray(a) - np.asarray(r)).max() <= 1e-4 * np.abs(np.asarray(r)).max()
    if kernel == "splash":  # the heads-major entry ([B, N, T, H] in and out) the projections feed on TPU
        swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        hm = swap(dot_product_attention(swap(q), swap(kk), swap(v), mask, Ops(attention_impl="splash"),
                                        heads_major=True))
        np.testing.assert_allclose(np.where(sel, hm, 0), np.where(sel, out["xla"], 0), atol=2e-5, rtol=1e-4)


def test_auto_is_einsum_on_cpu_and_dense_masks_never_go_to_splash():
    valid = jnp.ones((1, 8), bool)
    assert resolve_impl("auto", jnp.bfloat16, 64, SequenceMask(valid), 8) == "xla"
    assert resolve_impl("splash", jnp.float32, 64, jnp.ones((1, 1, 1, 8), bool), 8) == "xla"
    assert resolve_impl("cudnn", jnp.bfloat16, 64, SequenceMask(valid), 8) == "cudnn"
    assert resolve_impl("pallas", jnp.float32, 64, jnp.ones((1, 1, 1, 8), bool), 8) == "xla"
    # the model pads its sequence once (to the kernels' 128 blocks) and projects heads-major only for splash
    assert [sequence_multiple(i, jnp.bfloat16, 64, 600)
            for i in ("auto", "xla", "splash", "pallas")] == [1, 1, 128, 128]
    assert [heads_major(i, jnp.bfloat16, 64, 600) for i in ("auto", "splash", "pallas")] == [False, True, False]
    with pytest.raises(ValueError, match="splash kernel only"):
        dot_product_attention(*[jnp.ones((1, 2, 8, 4))] * 3, SequenceMask(valid), Ops(attention_impl="xla"),
                              heads_major=True)


def test_auto_on_gpu_is_cudnn_else_pallas_for_16_bit(monkeypatch):
    from osum_jax.models import attention

    for avail, want in ((True, "cudnn"), (False, "pallas")):
        monkeypatch.setattr(attention, "cudnn_available", lambda: avail)
        assert attention.impl_for("auto", "cuda", jnp.bfloat16, 128) == want
        assert attention.impl_for("auto", "cuda", jnp.float32, 128) == "xla"
    assert attention.impl_for("auto", "tpu", jnp.float32, 64) == "splash"


def test_auto_on_tpu_runs_splash_for_long_sequences_only():
    """On TPU ``auto`` pads a stack to the kernel's 128-row blocks only where the sequence, so rounded, is at least
    SPLASH_MIN_LENGTH; shorter stacks run the einsum path unpadded. The stack (which pads) and its layers (which
    see the padded length) resolve the same way."""
    from osum_jax.models import attention

    assert attention.SPLASH_MIN_LENGTH == 512
    assert [attention.impl_for("auto", "tpu", jnp.bfloat16, 128, n) for n in (61, 175, 384, 385, 512, 1450)] == \
        ["xla", "xla", "xla", "splash", "splash", "splash"]
    # a splash stack pads once for all its layers only where that is at most STACK_PAD_MAX (10 %) of its length:
    # the recipe's LLM rows of 628 (-> 640) and encoders of 1450 (-> 1536) / 1170 (-> 1280) positions; LLM rows
    # of 454 (-> 512, 12.8 %) and 385 (-> 512) pad inside each attention call instead
    assert attention.STACK_PAD_MAX == 0.10
    for n, want in ((175, 1), (385, 1), (454, 1), (628, 128), (1170, 128), (1450, 128)):
        m = sequence_multiple("auto", jnp.bfloat16, 128, n, "tpu")
        padded = -(-n // m) * m
        assert attention.impl_for("auto", "tpu", jnp.bfloat16, 128, padded) == attention.impl_for(
            "auto", "tpu", jnp.bfloat16, 128, n)
        assert m == want, n
    assert sequence_multiple("splash", jnp.bfloat16, 128, 61, "tpu") == 1  # 61 -> 128 would be 110 % padding
    # an explicit kernel is what runs, whatever the length
    assert attention.impl_for("splash", "tpu", jnp.bfloat16, 128, 61) == "splash"
    assert attention.impl_for("xla", "tpu", jnp.bfloat16, 128, 4096) == "xla"
    with pytest.raises(ValueError, match="expected one of"):
        resolve_impl("flash", jnp.float32, 64, None, 8)


def _batch(rng):
    fl, pl, tl = np.array([96, 61, 30, 77]), np.array([5, 2, 0, 4]), np.array([7, 3, 5, 6])
    return dict(feats=rng.standard_normal((4, 96, 80)).astype(np.float32), feats_lengths=fl,
                prompt=np.where(np.arange(5) < pl[:, None], rng.integers(0, 256, (4, 5)), -1), prompt_lengths=pl,
                target=np.where(np.arange(7) < tl[:, None], rng.integers(0, 256, (4, 7)), -100),
                target_lengths=tl)


@pytest.mark.slow
@pytest.mark.parametrize("stack_pad_max", [0.0, 10.0], ids=["pad-per-call", "pad-once-per-stack"])
def test_osum_loss_and_gradients_with_splash_on_a_mesh_equal_einsum(stack_pad_max, monkeypatch):
    """Whole model (Whisper, adapter, Qwen2+LoRA), splash under shard_map on a 2x2x2 CPU mesh vs einsum; every
    stack padded once to the kernel's blocks, or every attention call padding its own q/k/v."""
    from osum_jax.models import attention

    monkeypatch.setattr(attention, "STACK_PAD_MAX", stack_pad_max)
    batch = _batch(np.random.default_rng(1))
    results = {}
    for impl in ("xla", "splash"):
        cfg = tiny_model_config(**{"llm.vocab_size": 256, "attention_impl": impl})
        mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        ops = Ops.from_config(cfg, mesh=mesh, activation_rules=DEFAULT_ACTIVATION_RULES)
        graphdef, params, rest = nnx.split(OSUM(cfg, rngs=nnx.Rngs(0), ops=ops), nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, p, rest)(batch)["loss"]

        with jax.set_mesh(mesh):
            results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    assert_same_loss_and_grads(results["splash"], results["xla"], loss_rtol=1e-5, grad_rel=1e-4)
