"""Sharded training step: mesh (2,2,2) == one device; fire_module freezing; non-finite updates are skipped."""

import jax
import numpy as np
import pytest
from flax import nnx

from osum_jax.config_loading import load_config
from osum_jax.train.trainable import trainable_filter
from osum_jax.train.trainer import Trainer
from tests.helpers import rel_err


def _cfg(**train):
    ov = [f"train.{k}={v}" for k, v in train.items()]
    return load_config("configs/tiny.yaml", ["train.output_dir=/tmp/unused", "train.progress=false",
                                            "train.warmup_steps=1", "train.learning_rate=5e-5",
                                            "train.grad_accum=1"] + ov)


def _batch(seed=0, b=4):
    rng = np.random.default_rng(seed)
    fl = np.array([120, 97, 64, 33])[:b]
    pl = np.array([5, 3, 4, 2])[:b]
    tl = np.array([6, 4, 3, 5])[:b]
    return dict(feats=rng.standard_normal((b, 120, 80)).astype(np.float32), feats_lengths=fl,
                prompt=np.where(np.arange(5) < pl[:, None], rng.integers(0, 512, (b, 5)), -1), prompt_lengths=pl,
                target=np.where(np.arange(6) < tl[:, None], rng.integers(0, 512, (b, 6)), -100), target_lengths=tl)


def _grads(trainer, host_batch):
    """Gradients of the trainable parameters on the trainer's mesh (fixed dropout key), as numpy."""
    @nnx.jit
    def grads(model, batch, key):
        return nnx.grad(lambda m: m(batch, key)["loss"], argnums=nnx.DiffState(0, trainer.filter))(model)

    with jax.set_mesh(trainer.mesh):
        g = grads(trainer.model, trainer.micro_batch(host_batch), jax.random.key(7))
    return {".".join(map(str, k)): np.asarray(jax.device_get(v)) for k, v in nnx.to_flat_state(g)}


def _params(trainer):
    return {".".join(map(str, k)): np.asarray(jax.device_get(v)) for k, v in
            nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))}


@pytest.mark.slow
def test_mesh_2x2x2_step_equals_single_device(tmp_path):
    """Same loss, same gradients and same updated parameters on mesh (data 2, fsdp 2, tensor 2) as on one device.

    Gradients: every tensor's gradient agrees to 1e-5 of its largest entry. Updated parameters: every one with a
    non-zero initial value matches to <= 1e-5 relative. Zero-initialised tensors (biases, LoRA B) hold nothing
    but Adam's first update ``-lr * g / (|g| + eps)``; where |g| is near eps (or a rounding residue of an exact
    0) float32 rounding differences become update differences (measured up to 1.7e-3 of a step, varying with
    the dropout masks), so for those the check is 1e-2 of a step: the signs and the magnitudes of all clear
    gradients. The gradients themselves are compared above.
    """
    assert jax.device_count() == 8
    sharded = Trainer(_cfg(**{"fire_module": "all", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    single = Trainer(_cfg(**{"fire_module": "all", "mesh.fsdp": 1}), devices=jax.devices()[:1])
    assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # parameters really are distributed: an LLM MLP kernel is split over fsdp x tensor
    k = sharded.model.llm.layers.mlp.gate_proj.kernel.get_value()
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len({s.device for s in k.addressable_shards}) == 8
    p0 = _params(single)
    for a, b in zip(p0.values(), _params(sharded).values()):
        np.testing.assert_array_equal(a, b)  # same initialisation on both meshes
    lr = single.cfg.train.learning_rate
    gs, g1 = _grads(sharded, _batch(0)), _grads(single, _batch(0))
    assert sorted(gs) == sorted(g1) and len(g1) > 20
    for name, g in g1.items():
        # + 1e-9: the adapter's key bias has an exact gradient of 0, computed as rounding residues of ~1e-11
        assert np.abs(gs[name] - g).max() <= 1e-5 * np.abs(g).max() + 1e-9, name
    out_s = sharded.train_micro_step(sharded.micro_batch(_batch(0)))
    out_1 = single.train_micro_step(single.micro_batch(_batch(0)))
    assert rel_err(out_s["loss"], out_1["loss"]) <= 1e-5
    assert rel_err(out_s["grad_norm"], out_1["grad_norm"]) <= 1e-5
    p1, ps = _params(single), _params(sharded)
    zero_init = 0
    for name in p1:
        assert not np.array_equal(p1[name], p0[name]), f"{name} did not train"
        if np.any(p0[name]):
            assert rel_err(ps[name], p1[name]) <= 1e-5, name
        else:
            zero_init += 1
            assert np.abs(ps[name] - p1[name]).max() <= 1e-2 * lr, name
    assert 0 < zero_init < len(p1) // 2
    # and the next step still agrees
    out_s = sharded.train_micro_step(sharded.micro_batch(_batch(1)))
    out_1 = single.train_micro_step(single.micro_batch(_batch(1)))
    assert rel_err(out_s["loss"], out_1["loss"]) <= 1e-5
    # a checkpoint written on the 8-device mesh restores onto one device, optimizer state included
    sharded.step = 1
    sharded.out_dir = single.out_dir = tmp_path
    sharded.open_checkpoints()
    sharded.save()
    sharded.checkpointer.close()
    single.open_checkpoints()
    assert single.restore_latest() and single.step == 1
    for name, value in _params(sharded).items():
        np.testing.assert_array_equal(_params(single)[name], value, err_msg=name)
    assert single.model.llm.layers.mlp.gate_proj.kernel.get_value().sharding.num_devices == 1
    batch = _batch(2)
    out_s = sharded.train_micro_step(sharded.micro_batch(batch))
    out_1 = single.train_micro_step(single.micro_batch(batch))
    assert rel_err(out_s["loss"], out_1["loss"]) <= 1e-5
    single.checkpointer.close()


def _part(name: str) -> str:
    """The coarse part of the model a parameter belongs to (independent of osum_jax.train.trainable)."""
    if name.endswith((".lora_a", ".lora_b")):
        return "lora"
    top = name.split(".")[0]
    return {"encoder": "encoder", "adapter": "link", "speech_embed": "link", "llm": "llm"}[top]


@pytest.mark.slow
@pytest.mark.parametrize("fire_module, parts", [
    ("lora", {"lora"}),
    ("link_and_encoder_and_lora", {"encoder", "link", "lora"}),
    ("link", {"link"}),
])
def test_fire_module_freezes_exactly(fire_module, parts):
    """The oracle is the project's own ``trainable_filter`` for every tensor: after two steps each parameter it
    selects has changed and each one it leaves out is bit-identical (LoRA tensors and the base LLM included).
    The filter itself is checked against the documented table (``parts``), so widening ``link`` to LoRA, in the
    filter or in the trainer, fails this test.

    No exception for LoRA's ``lora_a``: ``lora_b`` starts at zero, so ``lora_a`` has a zero gradient on the first
    step, but AdamW's weight decay moves it on that step and the second step has a real gradient."""
    trainer = Trainer(_cfg(fire_module=fire_module, **{"mesh.fsdp": 1}), devices=jax.devices()[:1])
    flt = trainable_filter(fire_module, trainer.cfg.model.lora.rank > 0)
    selected = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(trainer.model, flt))}
    before = _params(trainer)
    # the filter is the documented table: whole parts of the model, exactly the expected ones
    expected = {name for name in before if _part(name) in parts}
    assert selected == expected, {"selected, not expected": sorted(selected - expected),
                                  "expected, not selected": sorted(expected - selected)}
    for step in range(2):
        trainer.train_micro_step(trainer.micro_batch(_batch(step)))
    after = _params(trainer)
    for name, value in before.items():
        if name in selected:
            assert not np.array_equal(after[name], value), f"{name} should train under fire_module={fire_module}"
        else:
            np.testing.assert_array_equal(after[name], value,
                                          err_msg=f"{name} must stay bit-identical under fire_module={fire_module}")


def _no_dropout(cfg):
    import dataclasses

    m = cfg.model
    model = dataclasses.replace(
        m, encoder=dataclasses.replace(m.encoder, dropout=0.0, positional_dropout=0.0),
        adapter=dataclasses.replace(m.adapter, dropout=0.0, positional_dropout=0.0),
        lora=dataclasses.replace(m.lora, dropout=0.0))
    return dataclasses.replace(cfg, model=model)


@pytest.mark.slow
def test_nonfinite_gradient_skips_the_whole_window():
    """grad_accum=2: a NaN in the first micro-batch of a window skips that window's update (parameters, Adam state
    and step count untouched, counted); the next window is exactly a fresh run's first window, and windows stay
    aligned with the optimizer steps (the old optax.apply_if_finite(MultiSteps) shifted them by one)."""
    cfg = _no_dropout(_cfg(fire_module="link", grad_accum=2, **{"mesh.fsdp": 1}))
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    before = _params(trainer)
    bad = _batch(0)
    bad["feats"] = bad["feats"].copy()
    bad["feats"][0, 0, 0] = np.nan
    out = trainer.train_micro_step(trainer.micro_batch(bad))
    assert not np.isfinite(float(out["loss"]))
    out = trainer.train_micro_step(trainer.micro_batch(_batch(3)))  # the window's end: skipped as a whole
    assert np.isfinite(float(out["loss"])) and int(out["skipped_windows"]) == 1
    after = _params(trainer)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for seed in (1, 2):  # the next window trains, as a fresh run's first window does
        out = trainer.train_micro_step(trainer.micro_batch(_batch(seed)))
    assert int(out["skipped_windows"]) == 1 and np.isfinite(float(out["window_grad_norm"]))
    fresh = Trainer(cfg, devices=jax.devices()[:1])
    for seed in (1, 2):
        ref = fresh.train_micro_step(fresh.micro_batch(_batch(seed)))
    assert float(ref["window_grad_norm"]) == float(out["window_grad_norm"])
    got, want = _params(trainer), _params(fresh)
    assert any(not np.array_equal(got[n], before[n]) for n in before)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_bfloat16_frozen_weights():
    trainer = Trainer(_cfg(fire_module="lora", frozen_param_dtype="bfloat16", **{"mesh.fsdp": 1}),
                      devices=jax.devices()[:1])
    assert trainer.model.llm.layers.mlp.up_proj.kernel.get_value().dtype == jax.numpy.bfloat16
    assert trainer.model.llm.layers.self_attn.q_proj.lora_a.get_value().dtype == jax.numpy.float32
    out = trainer.train_micro_step(trainer.micro_batch(_batch(0)))
    assert np.isfinite(float(out["loss"]))


def test_init_from_restores_straight_onto_the_mesh(tmp_path):
    """train.init_from (a converter checkpoint, then a run directory) restores every array with the sharding the
    run's mesh gives it: values equal to the source, and each device holds only its shard."""
    from osum_jax import checkpoint as ck
    from osum_jax.checkpoint import flat_variables
    from osum_jax.models import OSUM

    base = _cfg(fire_module="all")
    src = OSUM(base.model, rngs=nnx.Rngs(123))  # a different seed than the trainer's own initialisation
    want = {k: np.asarray(v.get_value()) for k, v in flat_variables(src).items()}
    ck.write_checkpoint(tmp_path / "init", {k: ck.StreamedArray.of(a) for k, a in want.items()}, base, {}, {})
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    tr = Trainer(_cfg(fire_module="all", init_from=str(tmp_path / "init"), **mesh))
    got = flat_variables(tr.model)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(jax.device_get(got[name].get_value())), value, err_msg=name)
    k = tr.model.llm.layers.mlp.gate_proj.kernel.get_value()  # [layers, hidden, intermediate]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in k.addressable_shards} == {(k.shape[0], k.shape[1] // 2, k.shape[2] // 2)}
    # a run directory written on that mesh starts a one-device run
    tr.step, tr.out_dir = 1, tmp_path / "run"
    tr.open_checkpoints()
    tr.save()
    tr.checkpointer.close()
    from osum_jax.convert.commands import inspect

    report = inspect(tmp_path / "run")  # `osum-convert inspect RUN_DIR`
    assert report.startswith(f"osum-train run {tmp_path / 'run'}") and "steps [1]" in report
    assert "llm.layers (LoRA)" in report and "optimizer state:" in report and "fire_module all" in report
    one = Trainer(_cfg(fire_module="lora", init_from=str(tmp_path / "run"), **{"mesh.fsdp": 1}),
                  devices=jax.devices()[:1])
    for name, var in flat_variables(one.model).items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), want[name], err_msg=name)
    # a checkpoint of another model size is refused before anything is read
    other = load_config("configs/tiny.yaml", ["train.output_dir=/tmp/unused", "model.llm.num_layers=3",
                                              f"train.init_from={tmp_path / 'init'}", "train.mesh.fsdp=1"])
    with pytest.raises(ValueError, match="model.llm differs"):
        Trainer(other, devices=jax.devices()[:1])


def test_init_parts_takes_only_the_named_parts(tmp_path):
    """train.init_parts=[encoder,adapter]: those parts come from train.init_from, every other array is the run's own
    initialisation (train.seed), as a run without init_from has it. Unknown parts, repeated parts, or parts without
    init_from are a config error."""
    from osum_jax import checkpoint as ck
    from osum_jax.checkpoint import flat_variables
    from osum_jax.config import ConfigError
    from osum_jax.models import OSUM

    base = _cfg(fire_module="all")
    src = OSUM(base.model, rngs=nnx.Rngs(123))
    theirs = {k: np.asarray(v.get_value()) for k, v in flat_variables(src).items()}
    ck.write_checkpoint(tmp_path / "init", {k: ck.StreamedArray.of(a) for k, a in theirs.items()}, base, {}, {})
    one = {"mesh.fsdp": 1}
    fresh = {k: np.asarray(v.get_value()) for k, v in flat_variables(
        OSUM(base.model, rngs=nnx.Rngs(base.train.seed))).items()}  # what train.seed initialises, built directly
    tr = Trainer(_cfg(fire_module="all", init_from=str(tmp_path / "init"), init_parts="[encoder,adapter]", **one),
                 devices=jax.devices()[:1])
    got = {k: np.asarray(v.get_value()) for k, v in flat_variables(tr.model).items()}
    assert sorted(got) == sorted(theirs)
    parts = {k.split(".")[0] for k in got}
    assert parts == {"encoder", "adapter", "speech_embed", "llm"}
    for name, value in got.items():
        if name.split(".")[0] in ("encoder", "adapter"):
            np.testing.assert_array_equal(value, theirs[name], err_msg=name)
        else:  # the trainer initialises under jit: the same draws, within float32 rounding of eager
            np.testing.assert_allclose(value, fresh[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert not np.array_equal(got["llm.embed_tokens"], theirs["llm.embed_tokens"])
    for bad, msg in (("[encoder,lm]", "expected distinct names"), ("[encoder,encoder]", "expected distinct names")):
        with pytest.raises(ConfigError, match=msg):
            _cfg(init_from=str(tmp_path / "init"), init_parts=bad)
    with pytest.raises(ConfigError, match="without train.init_from"):
        _cfg(init_parts="[llm]")


def test_data_state_is_per_process_and_tied_to_the_data_layout(tmp_path):
    """The data item holds this process's iterator state in its own file (Grain's handler); a resume whose
    process count or data.num_workers differ from the checkpoint's is refused with both named, unless
    train.resume_data=false (model and optimizer restored, data started afresh)."""
    state = {"next_index": 17, "buffers": [[3, 5]], "skipped": {"too_long": 2}}
    tr = Trainer(_cfg(**{"mesh.fsdp": 1, "output_dir": tmp_path / "run", "async_checkpoint": "true"}),
                 devices=jax.devices()[:1])
    b = tr.model.llm.layers.self_attn.q_proj.lora_b  # not what a fresh initialisation gives
    b.set_value(b.get_value() + 1.0)
    tr.step, tr.data_state, tr.out_dir = 2, state, tmp_path / "run"
    tr.open_checkpoints()
    tr.save()
    tr.checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints/2/data").glob("*.json")) == ["process_0-of-1.json"]
    same = Trainer(_cfg(**{"mesh.fsdp": 1, "output_dir": tmp_path / "run"}), devices=jax.devices()[:1])
    same.open_checkpoints()
    assert same.restore_latest() and same.step == 2 and same.data_state == state
    more = load_config("configs/tiny.yaml", ["train.mesh.fsdp=1", f"train.output_dir={tmp_path / 'run'}",
                                             "data.num_workers=2", "train.grad_accum=1"])
    other = Trainer(more, devices=jax.devices()[:1])
    other.open_checkpoints()
    with pytest.raises(ValueError, match=r"'workers': 0.*'workers': 2.*train.resume_data=false"):
        other.restore_latest()
    fresh = Trainer(load_config("configs/tiny.yaml", ["train.mesh.fsdp=1", f"train.output_dir={tmp_path / 'run'}",
                                                      "data.num_workers=2", "train.resume_data=false",
                                                      "train.grad_accum=1"]),
                    devices=jax.devices()[:1])
    fresh.open_checkpoints()
    assert fresh.restore_latest() and fresh.step == 2 and fresh.data_state is None
    for a, b in zip(_params(tr).values(), _params(fresh).values()):
        np.testing.assert_array_equal(a, b)
    # an optimizer state of another structure (an accumulator exists only for grad_accum > 1) is named, not dumped
    accum = Trainer(load_config("configs/tiny.yaml", ["train.mesh.fsdp=1", f"train.output_dir={tmp_path / 'run'}",
                                                      "train.grad_accum=4"]), devices=jax.devices()[:1])
    accum.open_checkpoints()
    with pytest.raises(ValueError, match="train.grad_accum=1.*train.grad_accum=4"):
        accum.restore_latest()


def test_schedules_start_above_zero_and_follow_their_formulas():
    """WarmupLR (OSUM): lr * min(sqrt(w/s), s/w) with s = step + 1; cosine warms up the same way (first update at
    lr / w, not 0), peaks at lr at step w - 1, then decays towards 0 at train.steps."""
    from osum_jax.train.optim import learning_rate_schedule

    lr, w = 1e-3, 10
    inv = learning_rate_schedule(_cfg(learning_rate=lr, warmup_steps=w, schedule="warmup_inverse_sqrt").train)
    for step in (0, 4, 9, 10, 99):
        s = step + 1
        assert abs(float(inv(step)) - lr * min((w / s) ** 0.5, s / w)) <= 1e-9
    cos = learning_rate_schedule(_cfg(learning_rate=lr, warmup_steps=w, schedule="cosine", steps=100).train)
    assert abs(float(cos(0)) - lr / w) <= 1e-9 and abs(float(cos(w - 1)) - lr) <= 1e-9
    assert 0 < float(cos(99)) < 0.01 * lr and float(cos(50)) < float(cos(20))


@pytest.mark.parametrize("k", [1, 3])
def test_accumulate_skipping_nonfinite_against_optax(k):
    """The accumulator on its own, against optax run directly on the window's mean gradient: a window with a
    non-finite gradient changes no parameter and no optimizer state (bit for bit) and is counted; a clean window
    gives optax's own update; the reported norm is that window's mean gradient's (0 for a skipped k=1 window)."""
    import optax

    from osum_jax.train.optim import accumulate_skipping_nonfinite

    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    opt = accumulate_skipping_nonfinite(inner, k)
    rng = np.random.default_rng(0)
    params = {"w": jax.numpy.asarray(rng.standard_normal((3, 4)), np.float32),
              "b": jax.numpy.asarray(rng.standard_normal(4), np.float32)}
    grads = [jax.tree.map(lambda p: jax.numpy.asarray(rng.standard_normal(p.shape), np.float32), params)
             for _ in range(2 * k)]
    grads[0] = {**grads[0], "b": grads[0]["b"].at[1].set(np.nan)}  # the first window is bad
    update = jax.jit(opt.update)
    state = opt.init(params)
    p = params
    for g in grads[:k]:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    assert int(state.skipped) == 1 and (k > 1 or float(state.last_norm) == 0.0)
    for name in params:
        np.testing.assert_array_equal(p[name], params[name])
    fresh = inner.init(params)
    for a, b in zip(jax.tree.leaves(state.inner), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    for g in grads[k:]:  # a clean window: optax on the mean gradient
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads[k:]) if k > 1 else grads[k]
    want_u, _ = inner.update(mean, fresh, params)
    want = optax.apply_updates(params, want_u)
    for name in params:
        np.testing.assert_allclose(p[name], want[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(state.last_norm), float(optax.tree.norm(mean)), rtol=1e-6)
    assert int(state.skipped) == 1
