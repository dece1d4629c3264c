"""Hand-written VJPs (models/kernels.py) and plain autodiff give the same loss and gradients."""

import jax
import numpy as np
import pytest
from flax import nnx

from osum_jax.models import OSUM
from osum_jax.models.kernels import custom_vjps, resolve
from tests.helpers import assert_same_loss_and_grads, tiny_model_config


def _batch(rng, b=3, t=96, p=5, l_=7):
    fl, pl, tl = np.array([96, 61, 30]), np.array([5, 2, 0]), np.array([7, 3, 5])
    return dict(feats=rng.standard_normal((b, t, 80)).astype(np.float32), feats_lengths=fl,
                prompt=np.where(np.arange(p) < pl[:, None], rng.integers(0, 256, (b, p)), -1), prompt_lengths=pl,
                target=np.where(np.arange(l_) < tl[:, None], rng.integers(0, 256, (b, l_)), -100),
                target_lengths=tl)


@pytest.mark.slow
def test_custom_vjps_equal_autodiff():
    cfg = tiny_model_config(**{"llm.vocab_size": 256})
    model = OSUM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = _batch(np.random.default_rng(0))
    key = jax.random.key(3)  # dropout on: the LoRA and FFN paths see their dropout masks too

    def loss(p):
        return nnx.merge(graphdef, p, rest)(batch, key)["loss"]

    results = []
    for on in (True, False):
        with custom_vjps(on):
            results.append(jax.jit(jax.value_and_grad(loss))(params))
    assert_same_loss_and_grads(results[0], results[1], loss_rtol=1e-6, grad_rel=1e-5)


def test_auto_selects_custom_vjps_on_cpu_only():
    assert resolve("auto", "cpu") and resolve("auto", "tpu") and not resolve("auto", "gpu")
    assert resolve("always", "tpu") and not resolve("never", "cpu")


def test_matmul_barriers_change_no_values():
    """``model.matmul_barrier`` only changes what XLA fuses: the LLM's loss and gradients (LoRA, and the input
    embeddings, i.e. everything upstream) are the same with and without (with the hand-written VJPs, as on TPU);
    the traced program has the barriers only when asked."""
    from osum_jax.models.kernels import matmul_barriers
    from osum_jax.models.qwen2 import Qwen2

    cfg = tiny_model_config()
    llm = Qwen2(cfg.llm, cfg.lora, rngs=nnx.Rngs(0))
    graphdef, lora, rest = nnx.split(llm, nnx.LoRAParam, ...)
    lora = jax.tree.map(lambda p: p + 0.05, lora)  # B = 0 at init: make the adapters contribute
    rng = np.random.default_rng(0)
    b, s = 2, 9
    x = rng.standard_normal((b, s, cfg.llm.hidden_size)).astype(np.float32)
    valid = np.arange(s)[None] < np.array([[9], [6]])
    pos = np.broadcast_to(np.arange(s), (b, s))

    def loss(p, x):
        h = nnx.merge(graphdef, p, rest)(x, valid, pos, jax.random.key(1))
        return (h * np.linspace(-1, 1, h.shape[-1])).sum()

    results = []
    for on in (True, False):
        with custom_vjps(True), matmul_barriers(on):
            f = jax.value_and_grad(loss, argnums=(0, 1))
            assert ("optimization_barrier" in str(jax.make_jaxpr(f)(lora, x))) == on
            results.append(jax.jit(f)(lora, x))
    (l1, (g1, dx1)), (l0, (g0, dx0)) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-6)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert np.abs(np.asarray(a) - np.asarray(c)).max() <= 1e-5 * np.abs(np.asarray(c)).max() + 1e-9


def test_auto_puts_matmul_barriers_on_tpu_only():
    from osum_jax.models.kernels import resolve_barrier

    assert resolve_barrier("auto", "tpu") and not resolve_barrier("auto", "cpu") and not resolve_barrier("auto", "gpu")
    assert resolve_barrier("always", "cpu") and not resolve_barrier("never", "tpu")
