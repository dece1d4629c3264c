"""The backend choices of models/ops.py: hand-written VJPs and forms and plain autodiff give the same loss and
gradients, barriers change no value, hash dropout masks have the statistics dropout needs; and the model reads
them from its constructor (``Ops``), never from ambient state."""

import dataclasses
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from osum_jax.models import OSUM, Ops
from osum_jax.models.ops import resolve_custom_vjp, resolve_scan_unroll
from tests.helpers import assert_same_loss_and_grads, replace, tiny_model_config


def _batch(rng, b=3, t=96, p=5, l_=7):
    fl, pl, tl = np.array([96, 61, 30]), np.array([5, 2, 0]), np.array([7, 3, 5])
    return dict(feats=rng.standard_normal((b, t, 80)).astype(np.float32), feats_lengths=fl,
                prompt=np.where(np.arange(p) < pl[:, None], rng.integers(0, 256, (b, p)), -1), prompt_lengths=pl,
                target=np.where(np.arange(l_) < tl[:, None], rng.integers(0, 256, (b, l_)), -100),
                target_lengths=tl)


@pytest.mark.slow
def test_custom_vjps_equal_autodiff():
    """The whole model built with the hand-written forms (``Ops(custom_vjp=True)``: VJPs) and with plain
    autodiff of the references (``False``, the GPU path): same loss and gradients; only the first traces custom
    VJPs."""
    cfg = tiny_model_config(**{"llm.vocab_size": 256})
    _, params, rest = nnx.split(OSUM(cfg, rngs=nnx.Rngs(0), ops=Ops(custom_vjp=True)), nnx.Param, ...)
    batch = _batch(np.random.default_rng(0))
    key = jax.random.key(3)  # dropout on: the LoRA and FFN paths see their dropout masks too

    results = []
    for on in (True, False):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: OSUM(cfg, rngs=nnx.Rngs(0), ops=Ops(custom_vjp=on))))

        def loss(p, graphdef=graphdef):
            return nnx.merge(graphdef, p, rest)(batch, key)["loss"]

        f = jax.value_and_grad(loss)
        assert ("custom_vjp_call" in str(jax.make_jaxpr(f)(params))) == on
        results.append(jax.jit(f)(params))
    assert_same_loss_and_grads(results[0], results[1], loss_rtol=1e-6, grad_rel=1e-5)


@pytest.mark.slow
def test_unrolled_layer_scans_equal_the_rolled_scan():
    """``model.scan_unroll`` only changes how the layer stacks compile: the whole model's loss and gradients
    (remat on, dropout on) are the same with one layer per loop iteration, two, and every layer unrolled, and
    the fully unrolled program has none of the stacks' six loops left (forward and backward of encoder, adapter and
    LLM; threefry's own loops stay)."""
    cfg = tiny_model_config(**{"llm.vocab_size": 256, "encoder.num_layers": 4, "llm.num_layers": 3,
                               "remat_policy": "dots_with_no_batch_dims_saveable"})
    _, params, rest = nnx.split(OSUM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    batch = _batch(np.random.default_rng(0))
    key = jax.random.key(3)
    results, loops = {}, {}
    for unroll in (1, 2, 0):
        c = replace(cfg, scan_unroll=unroll)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda c=c: OSUM(c, rngs=nnx.Rngs(0))))

        def loss(p, graphdef=graphdef):
            return nnx.merge(graphdef, p, rest)(batch, key)["loss"]

        f = jax.value_and_grad(loss)
        loops[unroll] = jax.jit(f).lower(params).as_text().count("stablehlo.while")
        results[unroll] = jax.jit(f)(params)
    # 2 per loop iteration: the encoder's 4 layers still loop (twice), the adapter's 2 unroll, the LLM's 3 loop once
    # with one layer left over
    assert loops[1] - loops[0] == 6 and loops[1] - loops[2] == 2, loops
    assert_same_loss_and_grads(results[2], results[1], loss_rtol=1e-6, grad_rel=1e-5)
    assert_same_loss_and_grads(results[0], results[1], loss_rtol=1e-6, grad_rel=1e-5)


def test_auto_selects_custom_vjps_on_cpu_only():
    assert resolve_custom_vjp("auto", "cpu") and resolve_custom_vjp("auto", "tpu") \
        and not resolve_custom_vjp("auto", "gpu")
    assert resolve_custom_vjp("always", "tpu") and not resolve_custom_vjp("never", "cpu")
    # Ops() takes the platform's auto choices (this host: CPU); a config's settings are resolved the same way
    assert Ops().platform == "cpu" and Ops().custom_vjp and not Ops().matmul_barrier
    assert (Ops(platform="tpu").custom_vjp, Ops(platform="tpu").matmul_barrier) == (True, True)
    assert (Ops(platform="gpu").custom_vjp, Ops(platform="gpu").matmul_barrier) == (False, False)
    cfg = tiny_model_config()
    assert not Ops.from_config(replace(cfg, custom_vjp="never")).custom_vjp
    assert Ops.from_config(replace(cfg, matmul_barrier="always")).matmul_barrier
    assert Ops.from_config(cfg, dropout_rng="hash").hash_masks and not Ops.from_config(cfg).hash_masks
    # model.scan_unroll=auto: every layer unrolled on TPU only (tests/test_aot.py lowers both programs)
    assert [resolve_scan_unroll("auto", p) for p in ("tpu", "gpu", "cpu")] == [0, 1, 1]
    assert resolve_scan_unroll(3, "tpu") == 3 and Ops.from_config(replace(cfg, scan_unroll="auto")).scan_unroll == 1
    assert Ops.from_config(replace(cfg, attention_impl="xla")).attention_impl == "xla"
    assert hash(Ops()) == hash(Ops(platform="cpu")) and Ops() == Ops(platform="cpu")  # a static graph value


def test_models_read_no_ambient_state():
    """Backend choices reach the model as constructor arguments: no ContextVar anywhere in osum_jax/models."""
    models = pathlib.Path(__file__).resolve().parents[1] / "osum_jax" / "models"
    offenders = [p.name for p in sorted(models.glob("*.py"))
                 if re.search(r"contextvars|ContextVar[(\[]|threading\.local", p.read_text())]
    assert not offenders, offenders


def test_matmul_barriers_change_no_values():
    """``model.matmul_barrier`` only changes what XLA fuses: the LLM's loss and gradients (LoRA, and the input
    embeddings, i.e. everything upstream) are the same with and without (with the hand-written VJPs, as on TPU);
    the traced program has the barriers only when asked."""
    from osum_jax.models.qwen2 import Qwen2

    cfg = tiny_model_config()
    rng = np.random.default_rng(0)
    b, s = 2, 9
    x = rng.standard_normal((b, s, cfg.llm.hidden_size)).astype(np.float32)
    valid = np.arange(s)[None] < np.array([[9], [6]])
    pos = np.broadcast_to(np.arange(s), (b, s))

    def make(ops):
        llm = Qwen2(cfg.llm, cfg.lora, ops=ops, rngs=nnx.Rngs(0))
        graphdef, lora, rest = nnx.split(llm, nnx.LoRAParam, ...)
        lora = jax.tree.map(lambda p: p + 0.05, lora)  # B = 0 at init: make the adapters contribute

        def loss(p, x):
            h = nnx.merge(graphdef, p, rest)(x, valid, pos, jax.random.key(1))
            return (h * np.linspace(-1, 1, h.shape[-1])).sum()
        return loss, lora

    _assert_barriers_change_no_values(make, x)


def _assert_barriers_change_no_values(make, x):
    """``loss(params, x)`` of ``make(ops) -> (loss, params)`` and its gradients are the same with and without
    matmul barriers (hand-written VJPs, as on TPU), and the traced program has barriers only when asked."""
    results = []
    for on in (True, False):
        loss, params = make(Ops(custom_vjp=True, matmul_barrier=on))
        f = jax.value_and_grad(loss, argnums=(0, 1))
        assert ("optimization_barrier" in str(jax.make_jaxpr(f)(params, x))) == on
        results.append(jax.jit(f)(params, x))
    (l1, (g1, dx1)), (l0, (g0, dx0)) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-6)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert np.abs(np.asarray(a) - np.asarray(c)).max() <= 1e-5 * np.abs(np.asarray(c)).max() + 1e-9


def test_auto_puts_matmul_barriers_on_tpu_only():
    from osum_jax.models.ops import resolve_barrier

    assert resolve_barrier("auto", "tpu") and not resolve_barrier("auto", "cpu") and not resolve_barrier("auto", "gpu")
    assert resolve_barrier("always", "cpu") and not resolve_barrier("never", "tpu")


@pytest.mark.slow
def test_heads_major_projections_equal_token_major():
    """The projections the splash path uses (``to_heads`` / ``from_heads``: einsums emitting or reading
    ``[B, N, T, H]``) give the token-major projection's values and gradients, with the hand-written einsum VJP
    and with plain autodiff (and, with dropout, the two VJPs agree with each other); so do the heads-major bias
    add (its gradient a matmul with ones, or autodiff) and RoPE's rotation (a permutation matmul, or slices)."""
    from osum_jax.models.layers import Linear
    from osum_jax.models.lora import LoRALinear
    from osum_jax.models.positions import apply_rope

    rng = np.random.default_rng(0)
    b, t, d, n, h = 2, 5, 16, 4, 8
    x = jax.numpy.asarray(rng.standard_normal((b, t, d)), np.float32)
    heads = jax.numpy.asarray(rng.standard_normal((b, n, t, h)), np.float32)
    kw = dict(rank=4, alpha=8, lora_dropout=0.1, init_std=0.1, dtype=np.float32, param_dtype=np.float32)

    def projections(on):
        ops = Ops(custom_vjp=on)
        up = LoRALinear(d, n * h, axes=("embed", "heads"), use_bias=True, ops=ops, rngs=nnx.Rngs(1), **kw)
        down = LoRALinear(n * h, d, axes=("heads", "embed"), use_bias=False, ops=ops, rngs=nnx.Rngs(2), **kw)
        up.bias[...] = up.bias[...] + 0.2
        for m in (up, down):
            m.lora_b[...] = m.lora_b[...] + 0.3  # B = 0 at init: make the adapters contribute
        return up, down

    to_tokens = lambda y: y.transpose(0, 2, 1, 3)  # noqa: E731 - [B, N, T, H] <-> [B, T, N, H]

    def grads(module, fn, inp, key=None):
        graphdef, params = nnx.split(module)

        def loss(params, inp):
            return jax.numpy.sum(jax.numpy.sin(fn(nnx.merge(graphdef, params), inp, key)))
        return jax.value_and_grad(loss, argnums=(0, 1))(params, inp)

    def cases(on):  # (module, heads-major call, the token-major call it must equal, input)
        up, down = projections(on)
        return [
            (up, lambda m, x, k: m.to_heads(x, n, k), lambda m, x, k: to_tokens(m(x, k).reshape(b, t, n, h)), x),
            (down, lambda m, o, k: m.from_heads(o, k), lambda m, o, k: m(to_tokens(o).reshape(b, t, n * h), k),
             heads),
        ]
    for on in (True, False):
        for module, f_heads, f_tokens, inp in cases(on):
            (lh, gh), (lt, gt) = grads(module, f_heads, inp), grads(module, f_tokens, inp)
            np.testing.assert_allclose(lh, lt, rtol=1e-5)
            for u, v in zip(jax.tree.leaves(gh), jax.tree.leaves(gt), strict=True):
                np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    key = jax.random.key(7)  # with dropout: the hand-written einsum VJP equals autodiff of the same forward
    for (module_on, f_heads, _, inp), (module_off, *_) in zip(cases(True), cases(False), strict=True):
        runs = [grads(module_on, f_heads, inp, key), grads(module_off, f_heads, inp, key)]
        np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
        for u, v in zip(jax.tree.leaves(runs[0][1]), jax.tree.leaves(runs[1][1]), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    cos, sin = (jax.numpy.asarray(f(rng.standard_normal((b, t, h))), np.float32) for f in (np.cos, np.sin))
    for on in (True, False):
        ops = Ops(custom_vjp=on)
        lin = Linear(d, n * h, axes=("embed", "heads"), ops=ops, rngs=nnx.Rngs(3))
        lin_out = Linear(n * h, d, axes=("heads", "embed"), ops=ops, rngs=nnx.Rngs(4))
        np.testing.assert_allclose(lin.to_heads(x, n), to_tokens(lin(x).reshape(b, t, n, h)), rtol=1e-5, atol=1e-6)
        lin.bias[...] = lin.bias[...] + 0.1
        lin_def, lin_params = nnx.split(lin)

        def lin_grads(fn, lin_def=lin_def, lin_params=lin_params):
            return jax.grad(lambda p: jax.numpy.sum(jax.numpy.sin(fn(nnx.merge(lin_def, p)))))(lin_params)

        # to_heads's bias gradient (a matmul with ones, or autodiff) equals the token-major autodiff one
        gh, gt = lin_grads(lambda m: m.to_heads(x, n)), lin_grads(lambda m: to_tokens(m(x).reshape(b, t, n, h)))
        for u, v in zip(jax.tree.leaves(gh), jax.tree.leaves(gt), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lin_out.from_heads(heads), lin_out(to_tokens(heads).reshape(b, t, n * h)),
                                   rtol=1e-5, atol=1e-6)
        # RoPE on the heads-major layout (rotate_half as a permutation matmul, or slices) == the token-major one
        rope_heads = apply_rope(heads, cos, sin, heads_major=True, ops=ops)
        assert ("dot_general" in str(jax.make_jaxpr(
            lambda y: apply_rope(y, cos, sin, heads_major=True, ops=ops))(heads))) == on
        np.testing.assert_allclose(rope_heads, to_tokens(apply_rope(to_tokens(heads), cos, sin)), rtol=1e-6)


def test_hash_dropout_masks_have_the_right_statistics_and_shard_like_the_data():
    """``train.dropout_rng=hash``: the counter-hash masks keep the configured fraction, show no correlation
    between neighbouring elements, rows or keys (each estimate within 4 standard errors of 0), and a batch-sharded
    draw on a 2x2x2 mesh gives exactly the unsharded masks (global indices, like partitionable threefry)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from osum_jax.config import MeshConfig
    from osum_jax.models.ops import keep_mask
    from osum_jax.train.mesh import build_mesh

    shape = (8, 256, 1024)
    key = jax.random.key(11)
    m, p = keep_mask(key, 0.1, shape, hash_masks=True)
    m2, _ = keep_mask(jax.random.fold_in(key, 1), 0.1, shape, hash_masks=True)
    small, _ = keep_mask(key, 0.1, (4, 6), hash_masks=True)
    threefry, _ = keep_mask(key, 0.1, shape, hash_masks=False)
    m, m2 = np.asarray(m, np.float64), np.asarray(m2, np.float64)
    n = m.size
    se = np.sqrt(p * (1 - p) / n)
    assert abs(m.mean() - p) < 4 * se, (m.mean(), p)
    x, y = (m - p) / np.sqrt(p * (1 - p)), (m2 - p) / np.sqrt(p * (1 - p))
    for a, b in ((x[..., 1:], x[..., :-1]), (x[:, 1:], x[:, :-1]), (x[1:], x[:-1]), (x, y)):
        assert abs((a * b).mean()) < 4 / np.sqrt(a.size), (a * b).mean()
    assert not np.array_equal(m, np.asarray(threefry))  # it is a different generator, not threefry renamed
    assert np.asarray(small).shape == (4, 6)  # odd last dimension: one word per element

    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))

    @jax.jit
    def draw(key):
        mask, _ = keep_mask(key, 0.1, shape, hash_masks=True)
        return jax.lax.with_sharding_constraint(mask, sharding)

    sharded = draw(key)
    assert sharded.sharding.is_equivalent_to(sharding, 3)
    np.testing.assert_array_equal(np.asarray(sharded), m.astype(bool))
    hlo = draw.lower(key).compile().as_text()
    assert "[8,256," not in hlo and "[2,256," in hlo  # each device hashes its own rows, never the global batch


def _saved_residuals(remat: str, hash_: bool) -> str:
    """What ``jax.checkpoint`` with ``model.remat_policy=remat`` keeps from one Qwen2 decoder layer's forward
    pass (``jax.ad_checkpoint.print_saved_residuals``), with the dropout masks drawn by threefry or the hash."""
    import contextlib
    import io

    from osum_jax.models.attention import SequenceMask
    from osum_jax.models.positions import rope_cos_sin
    from osum_jax.models.qwen2 import Qwen2DecoderLayer

    cfg = tiny_model_config()
    ops = Ops(custom_vjp=True, hash_masks=hash_, attention_impl="xla")
    layer = Qwen2DecoderLayer(cfg.llm, cfg.lora, dtype=np.float32, param_dtype=np.float32, ops=ops,
                              rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    b, s = 2, 8
    x = np.random.default_rng(0).standard_normal((b, s, cfg.llm.hidden_size)).astype(np.float32)
    cos, sin = rope_cos_sin(np.broadcast_to(np.arange(s), (b, s)), cfg.llm.resolved_head_dim, cfg.llm.rope_theta)
    mask = SequenceMask(np.ones((b, s), bool), causal=True)
    out = io.StringIO()
    policy = ops.remat_policy(remat)

    def f(state, x):
        return nnx.merge(graphdef, state)(x, cos, sin, mask, jax.random.key(3)).sum()

    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=policy), state, x)
    return out.getvalue()


def test_remat_keeps_lora_outputs_and_only_threefry_masks():
    """The ``dots_*`` policies keep each LoRA projection's output (named ``lora_out``) instead of its two dot
    terms, and each norm's per-row statistics (``norm_stats``) instead of reducing again; threefry masks are kept
    (drawing them twice costs more than a byte per element), hash masks never are (recomputed, fused into their
    consumers); ``full`` keeps none of these."""
    dots = "dots_with_no_batch_dims_saveable"
    threefry, hashed, full = (_saved_residuals(dots, False), _saved_residuals(dots, True),
                              _saved_residuals("full", True))
    assert "named 'dropout_mask'" in threefry and "named 'dropout_mask'" not in hashed
    assert "named 'lora_out'" in threefry and "named 'lora_out'" in hashed
    assert "named 'norm_stats'" in threefry and "named 'norm_stats'" in hashed
    assert "named" not in full


def test_encoder_barriers_change_no_values():
    """The encoder block's fc2 input barrier (``model.matmul_barrier``) changes no loss or gradient value, dropout
    included, and is in the traced program only when asked."""
    from osum_jax.models.encoder_block import EncoderBlock

    x = np.random.default_rng(1).standard_normal((2, 8, 32)).astype(np.float32)
    mask = np.ones((2, 1, 8, 8), bool)

    def make(ops):
        block = EncoderBlock(32, 4, 64, act="gelu", key_bias=False, eps=1e-5, dropout_rate=0.1, dtype=np.float32,
                             param_dtype=np.float32, ops=dataclasses.replace(ops, attention_impl="xla"),
                             rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(block, nnx.Param)

        def loss(p, x):
            h = nnx.merge(graphdef, p)(x, mask, jax.random.key(2))
            return (h * np.linspace(-1, 1, 32)).sum()
        return loss, params

    _assert_barriers_change_no_values(make, x)


def test_hash_dropout_masks_pass_wider_statistical_tests():
    """What makes ``train.dropout_rng=hash`` the recipe's default (configs/osum_full.yaml), beyond the test above:
    no correlation at power-of-two strides along any axis (a counter hash's usual weakness), per-row keep counts
    distributed as Binomial(n, p) (chi-square over 1024 rows), and masks of the 28 layers' keys (fold_in, as the
    stacks derive them) pairwise uncorrelated. Every estimate is held to 4 standard errors."""
    from osum_jax.models.ops import keep_mask

    shape = (4, 1024, 1024)
    key = jax.random.key(3)
    m, p = keep_mask(key, 0.1, shape, hash_masks=True)
    layers = [np.asarray(keep_mask(jax.random.fold_in(key, i), 0.1, (64, 1024), hash_masks=True)[0], np.float64)
              for i in range(28)]
    m = np.asarray(m, np.float64)
    x = (m - p) / np.sqrt(p * (1 - p))
    for lag in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        for a, b in ((x[..., lag:], x[..., :-lag]), (x[:, lag:], x[:, :-lag])):
            assert abs((a * b).mean()) < 4 / np.sqrt(a.size), lag
    rows = m.reshape(-1, shape[-1]).sum(-1)  # keep counts of 4096 rows of 1024
    n = shape[-1]
    mean, var = n * p, n * p * (1 - p)
    assert abs(rows.mean() - mean) < 4 * np.sqrt(var / rows.size)
    # the variance of the counts is the binomial one (chi-square with rows - 1 degrees of freedom, +-4 sd)
    chi2 = ((rows - mean) ** 2 / var).sum()
    assert abs(chi2 - rows.size) < 4 * np.sqrt(2 * rows.size), chi2
    z = [(lay - p) / np.sqrt(p * (1 - p)) for lay in layers]
    worst = max(abs((z[i] * z[j]).mean()) for i in range(28) for j in range(i + 1, 28))
    # 378 pairs: 4.5 standard errors keeps the family's chance of a false alarm small
    assert worst < 4.5 / np.sqrt(z[0].size), worst
