"""The analytic FLOPs used for MFU agree with XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
from flax import nnx

from osum_jax.models import OSUM
from osum_jax.models.flops import forward_flops
from tests.helpers import tiny_model_config


def test_forward_flops_match_xla_cost_analysis():
    # one layer per stack: XLA's cost analysis counts a scanned (while-loop) body once, not per iteration
    cfg = tiny_model_config(**{"llm.vocab_size": 4096, "llm.num_layers": 1, "encoder.num_layers": 1,
                               "adapter.num_layers": 1})
    model = OSUM(cfg, rngs=nnx.Rngs(0))
    b, t, p, l_ = 2, 400, 8, 24
    batch = dict(feats=jnp.zeros((b, t, 80)), feats_lengths=jnp.full((b,), t), prompt=jnp.zeros((b, p), jnp.int32),
                 prompt_lengths=jnp.full((b,), p), target=jnp.zeros((b, l_), jnp.int32),
                 target_lengths=jnp.full((b,), l_))
    graphdef, state = nnx.split(model)

    def fwd(state, batch):
        return nnx.merge(graphdef, state)(batch)["loss"]

    compiled = jax.jit(fwd).lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = float(cost["flops"])
    ours = forward_flops(cfg, b, t, p, l_)
    assert 0.85 * xla <= ours <= 1.15 * xla, (ours, xla)
