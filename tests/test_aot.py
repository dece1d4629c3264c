"""The train step compiled for real accelerator targets on this CPU host (``osum-train --plan --target``).

libtpu (the TPU compiler, ``.[tpu-aot]``) and the jax CUDA plugin (``.[gpu-aot]``) are dev dependencies. A test
that needs one skips, saying what to install, where it is missing, and fails under ``OSUM_REQUIRE_TOOLS=1`` (as
``.ci/run`` runs): the ``tpu_compiler`` / ``gpu_compiler`` fixtures of conftest.py.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from osum_jax.config_loading import load_config
from osum_jax.perf.aot import compile_plan, parse_target
from osum_jax.models.flops import train_step_flops
from osum_jax.perf.hlo import analyse_hlo

pytestmark = pytest.mark.target

# The tiny model in bf16 with full remat, on a 4-chip v5p slice, pure FSDP: the pod set-up at toy size.
OSUM_TRAIN = str(Path(sys.executable).parent / "osum-train")  # the console script, as the README runs it
TINY_TPU = ["model.dtype=bfloat16", "model.remat_policy=full", "train.frozen_param_dtype=bfloat16",
            "train.mesh.data=1", "train.mesh.fsdp=-1", "data.frame_buckets=[1000]", "data.max_frames=1000",
            "data.target_buckets=[48]", "data.max_label_tokens=48", "data.max_frames_per_batch=1000",
            "data.max_tokens_per_batch=1000", "data.max_utts_per_device=1", "data.max_prompt_tokens=64"]


def test_hlo_flops_count_loop_trips():
    """FLOPs read from an optimized HLO module multiply a scanned body by its trip count (XLA's own
    cost_analysis counts it once), checked on a program whose FLOPs are known by construction."""
    m, k, n, trips = 32, 48, 24, 5

    def f(x, ws):
        def body(h, w):
            return jnp.tanh(h @ w), None
        return jax.lax.scan(body, x, ws)[0] @ jnp.ones((k, n))

    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    ws = jax.ShapeDtypeStruct((trips, k, k), jnp.float32)
    compiled = jax.jit(f).lower(x, ws).compile()
    report = analyse_hlo(compiled.as_text())
    assert report["flops"] == 2 * m * k * k * trips + 2 * m * k * n
    assert trips in report["loops"]


def test_what_xla_reports_is_taken_from_xla_and_where_it_cannot_the_text_count_is():
    """Without a loop, XLA's own ``bytes accessed`` is the HLO text's HBM count (so the report takes XLA's); with a
    loop, XLA counts the body once and the text count applies the trip count (XLA's ``flops`` also counts the
    elementwise ops, so only its dot part is compared)."""
    from osum_jax.perf.hlo import xla_cost_analysis

    m, k, n, trips = 64, 128, 32, 7

    def loop_free(a, b):
        return jnp.tanh(a @ b).sum()

    a, b = jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
    compiled = jax.jit(loop_free).lower(a, b).compile()
    xla, text = xla_cost_analysis(compiled), analyse_hlo(compiled.as_text())
    assert not text["loops"] and text["flops"] == 2 * m * k * n
    assert xla["bytes_accessed"] == text["hbm_bytes"] > 0
    assert xla["flops"] >= text["flops"]  # XLA's figure counts tanh and the sum too

    def looped(x, w):
        return jax.lax.fori_loop(0, trips, lambda i, h: jnp.tanh(h @ w), x)

    w = jax.ShapeDtypeStruct((k, k), jnp.float32)
    compiled = jax.jit(looped).lower(a, w).compile()
    xla, text = xla_cost_analysis(compiled), analyse_hlo(compiled.as_text())
    assert text["loops"] == [trips] and text["flops"] == 2 * m * k * k * trips
    assert 2 * m * k * k <= xla["flops"] < 2 * 2 * m * k * k  # one trip's dot (+ the loop counter), not seven


# The shape of XLA:TPU's windowed einsum loops (an FSDP all-gather fused with its matmul): no known_trip_count,
# the counter starts at a constant in the init tuple and steps by 2 up to 8, so the body runs 4 times, not 8.
STEPPED_LOOP = """HloModule stepped
%cond (p: (s32[], f32[16,32], f32[32,32])) -> pred[] {
  %p = (s32[], f32[16,32]{1,0}, f32[32,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%body (q: (s32[], f32[16,32], f32[32,32])) -> (s32[], f32[16,32], f32[32,32]) {
  %q = (s32[], f32[16,32]{1,0}, f32[32,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %h = f32[16,32]{1,0} get-tuple-element(%q), index=1
  %w = f32[32,32]{1,0} get-tuple-element(%q), index=2
  %d = f32[16,32]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%j, %two)
  ROOT %t = (s32[], f32[16,32]{1,0}, f32[32,32]{1,0}) tuple(%next, %d, %w)
}
ENTRY %main (x: f32[16,32], w: f32[32,32]) -> f32[16,32] {
  %x = f32[16,32]{1,0} parameter(0)
  %w0 = f32[32,32]{1,0} parameter(1)
  %start = s32[] constant(START)
  %init = (s32[], f32[16,32]{1,0}, f32[32,32]{1,0}) tuple(%start, %x, %w0)
  %loop = (s32[], f32[16,32]{1,0}, f32[32,32]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[16,32]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_stepping_by_two_runs_half_as_often():
    """Trip counts read off a loop without XLA's known_trip_count use its start and step: XLA:TPU's windowed
    einsums (``i += 2`` while ``i < 8``) had been counted 8 times, doubling the FSDP rows' FLOPs, collective
    bytes and cycles inside them."""
    dot = 2 * 16 * 32 * 32
    for start, trips in ((0, 4), (1, 4), (2, 3), (8, 0)):
        report = analyse_hlo(STEPPED_LOOP.replace("START", str(start)))
        assert report["flops"] == trips * dot, (start, report["flops"] / dot)


def test_a_conditional_is_charged_its_dearest_branch():
    """A conditional runs one branch: FLOPs (and cycles, bytes, collectives) count the most expensive one, not
    both (the optimizer's update-or-hold cond under gradient accumulation)."""
    m, k = 16, 64

    def f(p, x, w):
        return jax.lax.cond(p, lambda x: (x @ w) @ w, lambda x: x @ w, x)

    x, w = jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, k), jnp.float32)
    text = jax.jit(f).lower(jax.ShapeDtypeStruct((), jnp.bool_), x, w).compile().as_text()
    assert "conditional" in text
    assert analyse_hlo(text)["flops"] == 2 * (2 * m * k * k)  # the two-matmul branch; both would be 3


def test_hbm_traffic_counts_layer_slices_not_whole_stacks():
    """The roofline's HBM bytes (the GPU rows' step bound): a scan reading one layer of a stacked weight per
    iteration moves that layer, not the stack, and a stacked output updated in place moves the update. Counting
    operands whole made this program read its 8-layer stack 15.6 times; each layer once (plus writing the
    sliced copy XLA:CPU makes) is about 2."""
    layers, m, k = 8, 64, 256

    def f(x, ws):
        def body(h, w):
            h = jnp.tanh(h @ w)
            return h, h
        return jax.lax.scan(body, x, ws)

    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    ws = jax.ShapeDtypeStruct((layers, k, k), jnp.float32)
    report = analyse_hlo(jax.jit(f).lower(x, ws).compile().as_text())
    stack = layers * k * k * 4
    assert stack <= report["hbm_bytes"] < 8 * stack, report["hbm_bytes"] / stack


def test_targets_parse_and_refuse_bad_specs():
    t = parse_target("tpu:v5p:2x2x4")
    assert (t.devices, t.topology, t.chip.peak_tflops) == (16, "v5p:2x2x4", 459.0)
    g = parse_target("cuda:h100:16")
    assert (g.devices, g.topology) == (16, "1x2x8")
    for bad in ("v5p:2x2x4", "tpu:h100:8", "cuda:h100:12", "tpu:v5p:abc"):
        with pytest.raises(ValueError):
            parse_target(bad)


def _train_step_loops(cfg, target: str) -> int:
    """``stablehlo.while`` loops in ``cfg``'s train step lowered (not compiled) for ``target``."""
    from osum_jax.perf.aot import plan_program

    program, inputs = plan_program(cfg, target)
    return program.lower(inputs).as_text().count("stablehlo.while")


def test_scan_unroll_auto_unrolls_the_layer_stacks_for_tpu_only(tpu_compiler, gpu_compiler):
    """configs/osum_full.yaml's ``model.scan_unroll=auto``: the TPU program is the unrolled one (``0``: the six
    layer loops of encoder, adapter and LLM, forward and backward, are gone), the GPU program the scanned one."""
    def loops(target, unroll, mesh):
        return _train_step_loops(load_config("configs/tiny.yaml", TINY_TPU + mesh + [f"model.scan_unroll={unroll}"]),
                                 target)

    tpu = {u: loops("tpu:v5p:2x2x1", u, []) for u in ("auto", 0, 1)}
    assert tpu["auto"] == tpu[0] == tpu[1] - 6, tpu
    gpu = {u: loops("cuda:h100:2", u, ["train.mesh.fsdp=2"]) for u in ("auto", 0, 1)}
    assert gpu["auto"] == gpu[1] == gpu[0] + 6, gpu
    assert load_config("configs/osum_full.yaml").model.scan_unroll == "auto"
    # decoding keeps the scan under auto (measured better scanned on TPU); an explicit setting is taken as given
    from osum_jax.decode.program import Decoding, DecodeProgram
    from osum_jax.perf.aot import plan_program

    for unroll, decoded in (("auto", 1), (0, 0)):
        cfg = load_config("configs/tiny.yaml", TINY_TPU + [f"model.scan_unroll={unroll}"])
        mesh = plan_program(cfg, "tpu:v5p:2x2x1")[0].mesh
        assert DecodeProgram(cfg, mesh, Decoding(), 0).train.ops.scan_unroll == decoded


@pytest.fixture(scope="module")
def tiny_tpu_report(tpu_compiler):
    # the tiny model's stacks are shorter than attention.SPLASH_MIN_LENGTH, where auto runs the einsum path: name
    # the kernel, whose compiled program these tests check
    cfg = load_config("configs/tiny.yaml", TINY_TPU + ["model.attention_impl=splash"])
    return cfg, compile_plan(cfg, "tpu:v5p:2x2x1")


@pytest.mark.slow  # the fixture compiles the train step for TPU (~45 s)
def test_compiled_step_donates_trainable_and_optimizer_state(tiny_tpu_report):
    """Nothing frozen comes back: the outputs are the trainable parameters, the optimizer state and a few
    scalars, and (nearly) all of them alias the donated inputs."""
    _, r = tiny_tpu_report
    mem, state = r["memory_bytes"], r["state_bytes"]
    donated = state["trainable"] + state["optimizer"]
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # (the compiler's byte counts include TPU tile padding, which inflates the tiny model's small arrays)
    assert mem["outputs"] - mem["aliased"] <= 8192, (mem, state)  # only the metrics scalars are not aliased
    assert mem["aliased"] >= 0.9 * mem["outputs"] and mem["aliased"] >= donated, (mem, state)
    assert mem["outputs"] <= mem["arguments"] - state["frozen_and_buffers"], (mem, state)  # no frozen output


@pytest.mark.slow
def test_a_report_names_the_program_it_compiled(tiny_tpu_report):
    """``program_sha256`` (what ``bench_recipe.py --reuse`` checks a compiled row by) is the lowered program's:
    lowering alone gives the same digest, and any change to the program gives another."""
    from osum_jax.perf.aot import lowered_sha256

    cfg, r = tiny_tpu_report
    assert r["program_sha256"] == lowered_sha256(cfg, "tpu:v5p:2x2x1")
    other = load_config("configs/tiny.yaml", TINY_TPU + ["model.attention_impl=splash", "model.scan_unroll=0"])
    assert lowered_sha256(other, "tpu:v5p:2x2x1") != r["program_sha256"]


@pytest.mark.slow
def test_compiled_step_has_no_stack_copies_and_counts_its_flops(tiny_tpu_report):
    cfg, r = tiny_tpu_report
    assert r["stack_copies"]["frozen_count"] == 0, r["stack_copies"]
    b = r["batch_shape"]
    model = train_step_flops(cfg.model, b["batch"], b["frames"], b["prompt"], b["target"],
                             trainable=cfg.train.fire_module) / r["devices"]
    assert math.isclose(r["model_flops"], model)
    # the TPU program computes what the model needs, within what element-wise work and padding add
    # (attention runs in Pallas kernels, whose FLOPs are counted apart: every block, padding included)
    assert 0.9 * model <= r["hlo_flops"] + r["pallas_kernels"]["flops"], (r["hlo_flops"], model)
    assert r["hlo_flops"] <= 1.6 * model, (r["hlo_flops"], model)
    assert r["estimated_cycles"] > 0 and r["step_seconds"] > 0 and 0 < r["mfu"] < 1
    # tokens/s is per device: the global batch's LLM tokens (speech + prompt + bos/eos + target) / devices / step
    tokens = b["batch"] * (math.ceil(b["frames"] / 8) + b["prompt"] + 2 + b["target"])
    assert math.isclose(r["tokens_per_second"] * r["step_seconds"] * r["devices"], tokens)


@pytest.mark.slow
def test_tpu_step_runs_splash_attention_kernels_and_charges_them(tiny_tpu_report):
    """``attention_impl=splash`` compiles the TPU splash kernel (a Mosaic custom call per attention and pass), and
    the report counts its FLOPs, which the TPU cost model does not see."""
    cfg, r = tiny_tpu_report
    m, b = cfg.model, r["batch_shape"]
    assert r["attention"] == "splash" and r["dropout_rng"] == "threefry2x32"
    local = b["batch"] // r["devices"]
    pad = lambda n: -(-n // 128) * 128  # noqa: E731  (the kernel works on 128-row blocks)
    t1 = -(-b["frames"] // 2)
    t3 = t1
    for s in m.adapter.conv_strides:
        t3 = -(-t3 // s)
    stacks = [  # (layers, query heads, head dim, padded length) of each self-attention stack
        (m.encoder.num_layers, m.encoder.num_heads, m.encoder.d_model // m.encoder.num_heads, pad(t1)),
        (m.adapter.num_layers, m.adapter.num_heads, m.encoder.d_model // m.adapter.num_heads, pad(t3)),
        (m.llm.num_layers, m.llm.num_heads, m.llm.resolved_head_dim, pad(b["prompt"] + t3 + 2 + b["target"])),
    ]
    # full remat: forward, its recompute, dq and dkv per layer; 2 + 2 + 3 + 4 matmuls of [T, S, H] per head
    assert r["pallas_kernels"]["count"] == 4 * sum(n for n, *_ in stacks)
    expected = sum(n * local * h * 2 * t * t * d * (2 + 2 + 3 + 4) for n, h, d, t in stacks)
    assert math.isclose(r["pallas_kernels"]["flops"], expected, rel_tol=1e-9), (r["pallas_kernels"], expected)
    assert r["pallas_kernels"]["seconds"] > 0 and "Pallas kernels" in r["step_basis"]


@pytest.mark.slow
def test_pure_fsdp_moves_weights_not_activations(tiny_tpu_report):
    """Activations stay on their batch shard: the step's all-reduces carry at most the gradients of the
    trainable parameters that are not sharded (norms, biases, LoRA ranks) and the loss scalars, while the
    weights are all-gathered."""
    _, r = tiny_tpu_report
    coll = r["collectives"]
    assert coll["all-gather"]["bytes"] > 0
    assert coll["all-reduce"]["bytes"] <= 2 * r["state_bytes"]["replicated_trainable"] + 65536, coll


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_compiles_for_a_gpu_target_as_json_and_refuses_without_plan(gpu_compiler, tmp_path):
    """The README's command for NVIDIA (XLA:GPU through the jax CUDA plugin, no GPU here): the same donation."""
    out = subprocess.run([OSUM_TRAIN, "configs/tiny.yaml", "--plan", "--target", "cuda:h100:8", "--json"] + TINY_TPU,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["target"] == "cuda:h100:8" and r["devices"] == 8 and r["mesh"]["fsdp"] == 8
    assert r["batch_shape"]["frames"] == 1000 and r["batch_shape"]["batch"] % 8 == 0, r["batch_shape"]
    mem = r["memory_bytes"]
    assert mem["outputs"] - mem["aliased"] <= 8192 and mem["aliased"] >= 0.9 * mem["outputs"], mem
    assert r["step_basis"].startswith("roofline") and r["hlo_flops"] > 0 and r["hlo_hbm_bytes"] > 0
    # XLA:GPU has no cost model: two lower bounds on the step time and the MFU bounds they give, never a bare
    # step time or MFU (issue 30: "MFU 75.2 %" had been read as a prediction)
    assert not {"mfu", "step_seconds", "tokens_per_second"} & set(r), sorted(r)
    assert r["step_ms_bound_program"] > 0 and r["step_ms_bound_per_kernel"] > 0
    for kind in ("program", "per_kernel"):
        assert math.isclose(r[f"mfu_bound_{kind}"] * r[f"step_ms_bound_{kind}"] / 1e3 * 989e12, r["model_flops"])
    shares = [share for _, share in r["top_kernels_by_bound"]]  # where the per-kernel bound goes, largest first
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9, shares
    assert 0.8 <= r["hlo_flops"] / r["model_flops"] <= 2.0, (r["hlo_flops"], r["model_flops"])
    # bf16 on a GPU target without cuDNN (this host): the Pallas (Triton) flash-attention kernel, not the einsum
    # path (no [B, N, T, S] scores in the program), its FLOPs counted with the rest
    assert r["attention"] == "pallas" and r["dropout_rng"] == "threefry2x32"
    # (osum-train turns XLA's Triton GEMMs off on GPU: every matmul is a cuBLAS custom call, counted above)
    bad = subprocess.run([OSUM_TRAIN, "configs/tiny.yaml", "--target", "cuda:h100:8"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--target go(es) with --plan" in bad.stderr


@pytest.mark.e2e
def test_missing_compiler_is_one_line_naming_the_extra(tmp_path):
    """Without libtpu the planner says which extra installs it (exit 2, no traceback). Simulated with a
    ``libtpu`` module on the path that fails to import, as a missing package does."""
    (tmp_path / "libtpu.py").write_text("raise ImportError('No module named libtpu')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([OSUM_TRAIN, "configs/tiny.yaml", "--plan", "--target", "tpu:v5e:2x2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert 'pip install -e ".[tpu-aot]"' in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_plan_estimate_agrees_with_the_gpu_compiler_at_full_width(gpu_compiler):
    """``--plan`` (the quick estimate) within 15 % of XLA:GPU's own memory for OSUM's full widths and vocabulary
    (two layers per stack to keep the compile short) on 8 x H100, pure FSDP, bf16, remat as the pod recipe."""
    cfg = load_config("configs/osum_full.yaml", [
        "model.llm.num_layers=2", "model.encoder.num_layers=2", "model.adapter.num_layers=2",
        "model.dtype=bfloat16", "train.frozen_param_dtype=bfloat16",
        "model.remat_policy=dots_with_no_batch_dims_saveable", "train.mesh.data=1", "train.mesh.fsdp=8",
        # one 29 s utterance per GPU (the budgets are per device)
        "data.max_frames_per_batch=2900", "data.max_tokens_per_batch=630", "data.frame_buckets=[2900]",
        "data.max_utts_per_device=1", "data.max_prompt_tokens=64"])
    r = compile_plan(cfg, "cuda:h100:8")
    total, estimate = r["memory_bytes"]["total"], r["plan_estimate_bytes"]
    assert abs(estimate / total - 1) <= 0.15, (estimate / 1e9, total / 1e9, r["memory_bytes"])


def test_gpu_xla_defaults_keep_the_users_own_flags():
    from osum_jax.train.cli import apply_gpu_xla_defaults

    env = {}
    apply_gpu_xla_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true"}
    apply_gpu_xla_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true"


def test_triton_flash_attention_flops_are_counted(gpu_compiler):
    """The Pallas (Triton) attention kernels compiled for an H100: forward 2 and backward 5 products of
    [T, S, H] per head, read from the kernels' operands in the optimized HLO (XLA counts none of them)."""
    import numpy as np
    from jax.experimental.pallas.ops.gpu.attention import mha
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from osum_jax.perf.aot import target_devices
    from osum_jax.perf.hlo import analyse_hlo

    devices = target_devices(parse_target("cuda:h100:8"))
    sharding = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    b, t, n, h = 2, 256, 4, 64

    def grads(q, k, v, seg):
        return jax.grad(lambda q, k, v: mha(q, k, v, seg, sm_scale=h ** -0.5).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(q, k, v)

    qkv = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=sharding)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sharding)
    report = analyse_hlo(jax.jit(grads).lower(qkv, qkv, qkv, seg).compile().as_text())
    assert report["flops"] == 2 * (2 + 5) * b * n * t * t * h
    # the per-kernel roofline bound charges those FLOPs to the kernels that run them (none is lost)
    assert sum(k * f for k, f, _, _ in report["kernel_costs"]) == report["flops"]
