"""``osum-train CONFIG --plan --target T``: compile the exact train step for a TPU or NVIDIA target on this host.

The XLA compilers for real accelerators run on a CPU-only machine: libtpu (``pip install -e ".[tpu-aot]"``)
describes TPU slices (``jax.experimental.topologies``), and the jax CUDA plugin (``.[gpu-aot]``) compiles for an
NVIDIA GPU described by a target configuration (``gpu_targets.py``). The step compiled is
:class:`~osum_jax.train.step.TrainProgram`'s ``train_step``, the one ``osum-train`` runs: same function,
shardings, donation, remat and dtypes, on abstract inputs (nothing is allocated) for the largest bucket of the
data config. The report is the compiler's own:

* memory per device (``memory_analysis``): arguments, outputs, aliased (donated) bytes, temporaries;
* FLOPs per device, counted from the optimized HLO (dots and convolutions, scaled by loop trip counts; XLA's
  ``cost_analysis`` counts a loop body once; the HLO text analysis is ``hlo.py``, whose table says which figure
  comes from XLA and why the others cannot; XLA's own whole-program figures are reported beside them);
* collectives by kind with their bytes (loop trip counts included);
* on TPU, the compiler's cost model: the per-instruction ``estimated_cycles`` summed over executions and
  converted to seconds with the chip's calibration (a lone bf16 8192^3 matmul), then tokens/s and MFU at that
  step time, with the trainable-aware model FLOPs of ``flops.py``;
* elsewhere (GPU: XLA:GPU has no cost model) two roofline bounds (``hlo.roofline_bounds``): the whole program's
  ``max(FLOPs / peak, HBM bytes / bandwidth)`` and the per-kernel sum of each kernel's own max. Both are lower
  bounds on the step time, so the MFU at either is an upper bound (``mfu_bound_program``,
  ``mfu_bound_per_kernel``; no bare ``mfu``): not a prediction.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from ..config import Config, ConfigError
from .hlo import analyse_hlo, roofline_bounds, xla_cost_analysis

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" | "cuda"
    peak_tflops: float  # dense bf16 per chip
    hbm_gb: float  # per chip, as the vendor states it (decimal GB)
    hbm_tb_s: float
    seconds_per_cycle: float = 0.0  # TPU cost model calibration; 0 = no cost model


# Peaks and HBM: vendor figures. TPU calibration: the TPU compiler's estimated cycles for a lone bf16 8192^3 matmul
# and that matmul's time (v5p: 4,652,072 cycles ~ 2.79 ms; v5e: 9,557,312 cycles ~ 5.58 ms), see
# docs/training.md#compiling-for-pods.
CHIPS = {
    "v5p": Chip("v5p", "tpu", 459.0, 95.0, 2.76, 2.79e-3 / 4_652_072),
    "v5e": Chip("v5e", "tpu", 197.0, 16.0, 0.82, 5.58e-3 / 9_557_312),
    "v4": Chip("v4", "tpu", 275.0, 32.0, 1.2),
    "h100": Chip("h100", "cuda", 989.0, 80.0, 3.35),
    "h200": Chip("h200", "cuda", 989.0, 141.0, 4.8),
    "a100": Chip("a100", "cuda", 312.0, 80.0, 2.039),
}


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str
    chip: Chip
    topology: str  # TPU: "v5p:2x2x4"; GPU: "1xHOSTSxPER_HOST"
    devices: int  # all of them, every slice's
    slices: int = 1  # TPU slices joined by the data-centre network


def parse_target(spec: str) -> Target:
    """``tpu:v5p:2x2x4`` | ``tpu:v5p:2x2x4:2`` (two such slices over the data-centre network) | ``tpu:v5e:4x4`` |
    ``cuda:h100:8`` (8 GPUs per host; 16 = two hosts)."""
    parts = spec.split(":")
    slices = 1
    if len(parts) == 4 and parts[0] == "tpu":
        if not parts[3].isdigit() or int(parts[3]) < 1:
            raise ConfigError(f"--target {spec!r}: the slice count (4th field) must be a positive integer")
        slices, parts = int(parts[3]), parts[:3]
    if len(parts) != 3 or parts[0] not in ("tpu", "cuda"):
        raise ConfigError(f"--target {spec!r}: expected tpu:CHIP:TOPOLOGY (e.g. tpu:v5p:2x2x4) or cuda:GPU:N "
                          f"(e.g. cuda:h100:8)")
    platform, chip, shape = parts
    if chip not in CHIPS or CHIPS[chip].platform != platform:
        known = sorted(k for k, c in CHIPS.items() if c.platform == platform)
        raise ConfigError(f"--target {spec!r}: unknown {platform} chip {chip!r}; known: {known}")
    if platform == "tpu":
        if not re.fullmatch(r"\d+(x\d+)+", shape):
            raise ConfigError(f"--target {spec!r}: TPU topology must look like 2x2x4")
        return Target(spec, CHIPS[chip], f"{chip}:{shape}", slices * math.prod(int(d) for d in shape.split("x")),
                      slices)
    if not shape.isdigit() or int(shape) < 1:
        raise ConfigError(f"--target {spec!r}: the GPU count must be a positive integer")
    n = int(shape)
    per_host = min(n, 8)
    if n % per_host:
        raise ConfigError(f"--target {spec!r}: more than 8 GPUs must be a multiple of 8 (8 per host)")
    return Target(spec, CHIPS[chip], f"1x{n // per_host}x{per_host}", n)


def target_devices(target: Target) -> list:
    """The devices of ``target`` (topology descriptions, not attached hardware)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
    extra = "tpu-aot" if target.chip.platform == "tpu" else "gpu-aot"
    try:
        if target.chip.platform == "tpu":
            import libtpu  # noqa: F401  (the compiler; jax finds it by itself)

            # compiling only: several processes may load libtpu at once (without this, libtpu's lockfile lets
            # one process per host have it, as it must when it drives real chips)
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

            from ..platforms import TPU_NOISE, filtered_stderr

            with filtered_stderr(TPU_NOISE):  # libtpu's start-up lines about not running on a TPU VM
                kw = {"num_slices": target.slices} if target.slices > 1 else {}
                topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kw)
        else:
            import jax_plugins.xla_cuda12  # noqa: F401

            from .gpu_targets import target_config

            topo = topologies.get_topology_desc(topology_name=target.chip.name, platform="cuda",
                                                target_config=target_config(target.chip.name),
                                                topology=target.topology)
    except ImportError:
        raise MissingCompiler(f"compiling for {target.spec} needs the {target.chip.platform.upper()} compiler: "
                              f'pip install -e ".[{extra}]"') from None
    devices = list(topo.devices)
    if len(devices) != target.devices:
        raise ConfigError(f"--target {target.spec}: the topology has {len(devices)} devices, expected "
                          f"{target.devices}")
    return devices


class MissingCompiler(RuntimeError):
    """The target's XLA compiler (libtpu / the jax CUDA plugin) is not installed."""


# The TPU compiler's cost model gives a Mosaic (Pallas) custom call no estimated cycles; such kernels are charged
# at this fraction of the chip's peak, counting every block (a causal mask's skipped blocks included). See
# docs/training.md#attention-kernels.
MOSAIC_EFFICIENCY = 0.5


def _layer_counts(cfg: Config) -> set[int]:
    m = cfg.model
    return {m.encoder.num_layers, m.adapter.num_layers, m.llm.num_layers} - {1}


# -- the report ---------------------------------------------------------------------------------------------------



def attention_by_stack(mc, platform: str, shape) -> str:
    """The attention each stack runs for the batch ``shape`` (``model.attention_impl`` resolved per stack length):
    one name when all agree, else ``"encoder=splash adapter=xla llm=xla"``."""
    from ..models.attention import impl_for

    _, t, p, l_ = shape
    t1 = -(-t // 2)
    t3 = t1
    for stride in mc.adapter.conv_strides:
        t3 = -(-t3 // stride)
    stacks = {"encoder": (mc.encoder.d_model // mc.encoder.num_heads, t1),
              "adapter": (mc.encoder.d_model // mc.adapter.num_heads, t3),
              "llm": (mc.llm.resolved_head_dim, p + t3 + 2 + l_)}
    names = {k: impl_for(mc.attention_impl, platform, mc.dtype, hd, n) for k, (hd, n) in stacks.items()}
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    return " ".join(f"{k}={v}" for k, v in names.items())


def plan_program(cfg: Config, target_spec: str, bucket: tuple[int, int] | None = None):
    """``(program, abstract inputs)``: ``cfg``'s ``TrainProgram`` on ``target_spec``'s devices and the inputs of the
    data config's bucket with the most work per device, or of the ``(frames, target)`` ``bucket``."""
    from ..models.layers import as_dtype  # noqa: F401  (models import before the program)
    from ..train.mesh import build_mesh
    from ..train.step import TrainProgram

    program = TrainProgram(cfg, build_mesh(cfg.train.mesh, target_devices(parse_target(target_spec))))
    return program, program.abstract_inputs(program.bucket_batch(bucket) if bucket else program.largest_batch())


def compile_plan(cfg: Config, target_spec: str, *, hlo_out: str | None = None,
                 bucket: tuple[int, int] | None = None) -> dict[str, Any]:
    """Compile ``cfg``'s train step for ``target_spec`` and report what the compiler says (per device), for the
    data config's bucket with the most work per device or the ``(frames, target)`` ``bucket``."""
    import time

    target = parse_target(target_spec)
    program, inputs = plan_program(cfg, target_spec, bucket)
    mesh = program.mesh
    t0 = time.perf_counter()
    lowered = program.lower(inputs)
    compiled = lowered.compile()
    report = compiled_report(cfg, inputs, compiled, target.chip, target.spec, mesh.devices.size,
                             mesh.devices.flat[0].platform, time.perf_counter() - t0, hlo_out=hlo_out,
                             mesh_shape=dict(mesh.shape), rng_impl=program.rng_impl)
    report["program_sha256"] = program_sha256(lowered)
    return report


def program_sha256(lowered) -> str:
    """sha256 of a lowered program's StableHLO text (no source locations): the same digest means the compiler
    gets the same program, whatever the commit or the config spelling that produced it (the compiler itself and
    its flags are pinned apart: constraints.txt, ``XLA_FLAGS``)."""
    import hashlib

    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def lowered_sha256(cfg: Config, target_spec: str, bucket: tuple[int, int] | None = None) -> str:
    """:func:`program_sha256` of the train step :func:`compile_plan` would compile, lowered only (seconds, where
    the compile takes minutes): a compiled report whose ``program_sha256`` equals it is this program's."""
    program, inputs = plan_program(cfg, target_spec, bucket)
    return program_sha256(program.lower(inputs))


def llm_tokens(shape: tuple[int, int, int, int]) -> int:
    """LLM tokens of a batch ``(B, T, P, L)``: speech (T / 8 after the adapter) + prompt + bos/eos + target."""
    b, t, p, l_ = shape
    return b * (math.ceil(t / 8) + p + 2 + l_)


def chip_of(device) -> Chip | None:
    """The :data:`CHIPS` entry of an attached device (``device_kind`` such as "NVIDIA H200"), or None."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, chip in CHIPS.items():
        if re.search(rf"\b{name}\b", kind):
            return chip
    return None


def compiled_report(cfg: Config, inputs, compiled, chip: Chip | None, target: str, n: int, platform: str,
                    compile_s: float, *, hlo_out: str | None = None, mesh_shape: dict | None = None,
                    rng_impl: str = "") -> dict[str, Any]:
    """What the compiler says about one compiled train step (per device): :func:`compile_plan`'s report, also
    used for a step compiled on attached hardware (``scripts/bench_gpu_step.py``). ``chip`` None (e.g. CPU): no
    peak, so no roofline step time or MFU."""
    import jax

    from ..models.flops import train_step_flops
    from .plan import plan as estimate

    shape = tuple(inputs.batch["feats"].shape[:2]) + (inputs.batch["prompt"].shape[1],
                                                       inputs.batch["target"].shape[1])
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    if hlo_out:
        with open(hlo_out, "w", encoding="utf-8") as f:
            f.write(text)
    stacks = {tuple(x.sharding.shard_shape(x.shape)) for tree in (inputs.trainable, inputs.frozen, inputs.opt_state)
              for x in jax.tree.leaves(tree) if len(x.shape) >= 3 and x.shape[0] in _layer_counts(cfg)}
    frozen_stacks = {(str(x.dtype), tuple(x.sharding.shard_shape(x.shape))) for x in jax.tree.leaves(inputs.frozen)
                     if len(x.shape) >= 3 and x.shape[0] in _layer_counts(cfg)}
    hlo = analyse_hlo(text, stacks, frozen_stacks)
    xla = xla_cost_analysis(compiled)
    if not hlo["loops"] and "bytes_accessed" in xla:  # no loop: XLA's own count is the same figure (hlo.py)
        hlo["hbm_bytes"], hbm_source = xla["bytes_accessed"], "XLA cost_analysis"
    else:
        hbm_source = "HLO text, loop trips applied (cost_analysis counts a loop body once)"

    def leaves_bytes(tree) -> float:
        return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                         for x in jax.tree.leaves(tree)))

    trainable_b = leaves_bytes(inputs.trainable)
    opt_b = leaves_bytes(inputs.opt_state)
    frozen_b = leaves_bytes(inputs.frozen) + leaves_bytes(inputs.buffers)
    replicated_b = float(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(inputs.trainable)
                             if tuple(x.sharding.shard_shape(x.shape)) == tuple(x.shape)))
    memory = {
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    total = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    memory["total"] = total
    b, t, p, l_ = shape
    model_flops = train_step_flops(cfg.model, b, t, p, l_, trainable=cfg.train.fire_module) / n
    peak = chip.peak_tflops * 1e12 if chip else 0.0
    kernel_s = hlo["kernels"]["flops"] / (peak * MOSAIC_EFFICIENCY) if chip else 0.0
    tokens = llm_tokens(shape) / n
    if chip is None:  # no peak: no step time, no MFU
        step = {"step_basis": "no peak known for this device"}
    elif chip.seconds_per_cycle and hlo["estimated_cycles"]:
        step_s, basis = hlo["estimated_cycles"] * chip.seconds_per_cycle + kernel_s, "TPU cost model"
        if hlo["kernels"]["count"]:
            basis += f" + Pallas kernels at {MOSAIC_EFFICIENCY:.0%} of peak"
        step = {"step_seconds": step_s, "step_basis": basis, "tokens_per_second": tokens / step_s,
                "mfu": model_flops / step_s / peak}
    else:  # no cost model (GPU): two lower bounds on the step time, so upper bounds on MFU and tokens/s
        bounds = roofline_bounds(hlo, peak, chip.hbm_tb_s * 1e12)
        program_s, kernel_bound_s = bounds["program_seconds"], bounds["per_kernel_seconds"]
        step = {"step_basis": "roofline bounds (no cost model): lower bounds on the step time, upper bounds on MFU",
                "step_ms_bound_program": program_s * 1e3, "step_ms_bound_per_kernel": kernel_bound_s * 1e3,
                "mfu_bound_program": model_flops / program_s / peak if program_s else 0.0,
                "mfu_bound_per_kernel": model_flops / kernel_bound_s / peak if kernel_bound_s else 0.0,
                "tokens_per_second_bound": tokens / max(program_s, kernel_bound_s) if program_s else 0.0,
                "top_kernels_by_bound": bounds["top_kernels"]}
    hbm_gb = chip.hbm_gb if chip else 0.0
    est = estimate(cfg, n, hbm_gb or 1.0, batch_shape=shape, platform=platform)
    attention = attention_by_stack(cfg.model, platform, shape)
    return {
        "target": target, "devices": n, "mesh": mesh_shape, "batch_shape": {"batch": b, "frames": t,
                                                                             "prompt": p, "target": l_},
        "compile_seconds": compile_s, "attention": attention, "dropout_rng": rng_impl,
        "dropout_masks": cfg.train.dropout_rng,
        "memory_bytes": memory,
        "hbm_bytes": hbm_gb * GB,
        "headroom": 1.0 - total / (hbm_gb * GB) if hbm_gb else 0.0,
        "state_bytes": {"trainable": trainable_b, "optimizer": opt_b, "frozen_and_buffers": frozen_b,
                        "replicated_trainable": replicated_b},
        "hlo_flops": hlo["flops"],
        "hlo_hbm_bytes": hlo["hbm_bytes"],
        "hlo_hbm_bytes_source": hbm_source,
        "xla_cost_analysis": xla,  # XLA's whole-program figures, loop bodies once: for comparison, not the step
        "model_flops": model_flops,
        "collectives": hlo["collectives"],
        "stack_copies": hlo["stack_copies"],
        "estimated_cycles": hlo["estimated_cycles"],
        "pallas_kernels": {"count": hlo["kernels"]["count"], "flops": hlo["kernels"]["flops"], "seconds": kernel_s},
        "top_ops_by_cycles": hlo["top_ops_by_cycles"],
        **step,
        "plan_estimate_bytes": est["per_device_GiB"]["total"] * 1024 ** 3,
    }


def format_report(r: dict[str, Any]) -> str:
    m = r["memory_bytes"]
    g = 1e9
    lines = [
        f"target {r['target']}: {r['devices']} devices, mesh {r['mesh']}, batch {r['batch_shape']} "
        f"(compiled in {r['compile_seconds']:.0f} s, attention {r.get('attention', '?')}, "
        f"dropout keys {r.get('dropout_rng', '?')}, masks {r.get('dropout_masks', '?')})",
        "memory per device (compiler, GB):",
        f"  arguments {m['arguments'] / g:8.2f}   outputs {m['outputs'] / g:8.2f}   aliased {m['aliased'] / g:8.2f}"
        f"   temporaries {m['temporaries'] / g:8.2f}",
        f"  total     {m['total'] / g:8.2f} of {r['hbm_bytes'] / g:.0f} GB HBM (headroom {r['headroom']:.0%}); "
        f"--plan estimate {r['plan_estimate_bytes'] / g:.2f}",
        f"  state: trainable {r['state_bytes']['trainable'] / g:.2f}, optimizer {r['state_bytes']['optimizer'] / g:.2f}"
        f", frozen+buffers {r['state_bytes']['frozen_and_buffers'] / g:.2f}",
        f"FLOPs per device: compiled {r['hlo_flops'] / 1e12:.2f} T"
        f"{' + %.2f T in Pallas kernels' % (r['pallas_kernels']['flops'] / 1e12) if r.get('pallas_kernels', {}).get('count') else ''}"
        f", model (trainable-aware) "
        f"{r['model_flops'] / 1e12:.2f} T",
        "collectives per device and step:",
    ]
    for kind, c in r["collectives"].items():
        if c["count"]:
            lines.append(f"  {kind:20s} {int(c['count']):6d} ops {c['bytes'] / g:10.3f} GB")
    sc = r["stack_copies"]
    lines.append(f"whole layer-stack copies inside loops: {int(sc['count'])} ({sc['bytes'] / g:.3f} GB), of frozen "
                 f"weight stacks {int(sc['frozen_count'])} ({sc['frozen_bytes'] / g:.3f} GB)")
    pk = r.get("pallas_kernels", {})
    if pk.get("count"):
        lines.append(f"Pallas kernels (attention): {int(pk['count'])} calls, {pk['flops'] / 1e12:.2f} TFLOPs, charged "
                     f"{pk['seconds'] * 1e3:.1f} ms (no cost-model cycles for them)")
    lines += step_lines(r)
    if r.get("top_kernels_by_bound"):
        lines.append("where the per-kernel bound goes:")
        lines += [f"  {share:6.1%}  {op}" for op, share in r["top_kernels_by_bound"]]
    if r["top_ops_by_cycles"]:
        lines.append("where the estimated cycles go:")
        lines += [f"  {share:6.1%}  {op}" for op, share in r["top_ops_by_cycles"]]
    return "\n".join(lines)


def step_lines(r: dict[str, Any]) -> list[str]:
    """The step time and MFU lines of a report, each figure labelled with what it is: the TPU cost model's
    estimate, or (GPU) the two roofline bounds, printed as bounds (``>=`` step time, ``<=`` MFU)."""
    if "mfu" in r:
        return [f"step time {r['step_seconds'] * 1e3:.1f} ms ({r['step_basis']}); "
                f"{r['tokens_per_second']:.0f} LLM tokens/s per device; MFU {r['mfu']:.1%} (TPU cost model)"]
    if "mfu_bound_program" in r:
        return [
            f"step time >= {r['step_ms_bound_program']:.1f} ms, MFU <= {r['mfu_bound_program']:.1%} "
            f"(whole-program roofline bound: max(all FLOPs / peak, all HBM bytes / bandwidth))",
            f"step time >= {r['step_ms_bound_per_kernel']:.1f} ms, MFU <= {r['mfu_bound_per_kernel']:.1%} "
            f"(per-kernel roofline bound: each kernel's max(FLOPs / peak, HBM bytes / bandwidth), summed)",
            f"<= {r['tokens_per_second_bound']:.0f} LLM tokens/s per device. Bounds, not predictions: no cost model "
            f"for this target",
        ]
    return [f"step time: none ({r['step_basis']})"]
