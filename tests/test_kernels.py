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
