"""``osum-train CONFIG --plan --target T``: compile the exact train step for a TPU or NVIDIA target on this host.

The XLA compilers for real accelerators run on a CPU-only machine: libtpu (``pip install -e ".[tpu-aot]"``)
describes TPU slices (``jax.experimental.topologies``), and the jax CUDA plugin (``.[gpu-aot]``) compiles for an
NVIDIA GPU described by a target configuration (``gpu_targets.py``). The step compiled is
:class:`~osum_jax.train.step.TrainProgram`'s ``train_step``, the one ``osum-train`` runs: same function,
shardings, donation, remat and dtypes, on abstract inputs (nothing is allocated) for the largest bucket of the
data config. The report is the compiler's own:

* memory per device (``memory_analysis``): arguments, outputs, aliased (donated) bytes, temporaries;
* FLOPs per device, counted from the optimized HLO (dots and convolutions, scaled by loop trip counts; XLA's
  ``cost_analysis`` counts a loop body once);
* collectives by kind with their bytes (loop trip counts included);
* on TPU, the compiler's cost model: the per-instruction ``estimated_cycles`` summed over executions and
  converted to seconds with the chip's calibration (a lone bf16 8192^3 matmul); elsewhere a roofline bound
  ``max(FLOPs / peak, bytes / HBM bandwidth)``;
* tokens/s and MFU at that step time, with the trainable-aware model FLOPs of ``flops.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict
from typing import Any

from ..config import Config, ConfigError

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
    devices: int


def parse_target(spec: str) -> Target:
    """``tpu:v5p:2x2x4`` | ``tpu:v5e:4x4`` | ``cuda:h100:8`` (8 GPUs per host; 16 = two hosts)."""
    parts = spec.split(":")
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
        return Target(spec, CHIPS[chip], f"{chip}:{shape}", math.prod(int(d) for d in shape.split("x")))
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

            topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
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


# -- optimized HLO analysis ---------------------------------------------------------------------------------------

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
_COMP = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape_text)]


def _nbytes(arrays) -> float:
    return sum(_BYTES.get(dt, 1 if dt.startswith("f8") else 4) * math.prod(dims) for dt, dims in arrays)


def _split_shape(rest: str) -> tuple[str, str]:
    """``"(a, b) op(...)..."`` or ``"f32[2]{0} op(...)"`` -> (shape text, the rest from the opcode on)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    i = rest.find(" ")
    return rest[:i], rest[i + 1:].lstrip()


@dataclasses.dataclass
class Instr:
    name: str
    computation: str
    shape: str
    opcode: str
    text: str


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations of an HLO module text -> ({name: instructions}, entry name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        shape, rest = _split_shape(line[m.end():])
        opcode = rest.split("(", 1)[0].strip()
        comps[current].append(Instr(m.group(1), current, shape, opcode, rest))
    return comps, entry


def _trip_count(instr: Instr, comps: dict[str, list[Instr]]) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.text)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%([^\s,]+)", instr.text)
    body = comps.get(cond.group(1), []) if cond else []
    consts = {i.name: int(c.group(1)) for i in body
              if i.opcode == "constant" and (c := re.match(r"constant\((-?\d+)\)", i.text))}
    for i in body:  # i < N with the induction variable starting at 0 (how scans lower)
        if i.opcode == "compare" and "direction=LT" in i.text:
            for name in re.findall(r"%([^\s,)]+)", i.text.split("(", 1)[1]):
                if name in consts:
                    return consts[name]
    return 1


def _multiplicities(comps, entry) -> tuple[dict[str, float], set[str], dict[str, int]]:
    """How many times each computation runs per step; which are fusion bodies; loop trip counts by body."""
    mult: dict[str, float] = defaultdict(float)
    fused: set[str] = set()
    trips: dict[str, int] = {}
    mult[entry] = 1.0
    order = [entry]
    seen = {entry}
    while order:
        name = order.pop()
        for ins in comps.get(name, []):
            edges = []
            if ins.opcode == "while":
                n = _trip_count(ins, comps)
                for key in ("body", "condition"):
                    m = re.search(key + r"=%([^\s,]+)", ins.text)
                    if m:
                        edges.append((m.group(1), n))
                        if key == "body":
                            trips[m.group(1)] = n
            for m in re.finditer(r"(?:calls|true_computation|false_computation)=%([^\s,]+)", ins.text):
                edges.append((m.group(1), 1))
                if ins.opcode == "fusion":
                    fused.add(m.group(1))
            m = re.search(r"branch_computations=\{([^}]*)\}", ins.text)
            if m:
                edges += [(b.strip().lstrip("%"), 1) for b in m.group(1).split(",")]
            for child, k in edges:
                if child not in comps:
                    continue
                mult[child] += mult[name] * k
                if child not in seen:  # call graphs are DAGs; a computation reached twice adds both callers
                    seen.add(child)
                    order.append(child)
    return mult, fused, trips


def _flops(ins: Instr, shapes: dict[str, str]) -> float:
    out = _arrays(ins.shape)
    if not out:
        return 0.0
    n_out = math.prod(out[0][1])
    operands = re.findall(r"%([^\s,)]+)", ins.text.split("(", 1)[1].split(")", 1)[0])
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.text)
        lhs = _arrays(shapes.get(operands[0], "")) if operands else []
        if not m or not lhs:
            return 0.0
        k = math.prod(lhs[0][1][int(d)] for d in m.group(1).split(",") if d)
        return 2.0 * n_out * k
    if ins.opcode == "convolution":
        labels = re.search(r"dim_labels=([^_\s]+)_([^-\s]+)->([^,\s]+)", ins.text)
        lhs = _arrays(shapes.get(operands[0], "")) if operands else []
        rhs = _arrays(shapes.get(operands[1], "")) if len(operands) > 1 else []
        if not labels or not rhs or not lhs:
            return 0.0
        lhs_l, rhs_l, out_l = labels.groups()
        k_in = rhs[0][1][rhs_l.index("i")]
        spatial = sorted(c for c in out_l if c.isdigit())
        window = _window(ins.text, len(spatial))
        # XLA:TPU writes batched matmuls as convolutions whose dilated/strided windows touch one real element per
        # output; count only the taps that land on real (non-padding, non-dilation) input elements
        n_out_spatial, pairs = 1, 1
        for i, c in enumerate(spatial):
            n_in, n_o = lhs[0][1][lhs_l.index(c)], out[0][1][out_l.index(c)]
            n_out_spatial *= n_o
            pairs *= _valid_pairs(n_in, n_o, **{k: v[i] for k, v in window.items()})
        return 2.0 * n_out / max(n_out_spatial, 1) * k_in * pairs
    return 0.0


def _window(text: str, ndim: int) -> dict[str, list[int]]:
    w = {"size": [1] * ndim, "stride": [1] * ndim, "lo": [0] * ndim, "lhs_dilate": [1] * ndim,
         "rhs_dilate": [1] * ndim}
    m = re.search(r"window=\{([^}]*)\}", text)
    if not m:
        return w
    for item in m.group(1).split():
        key, _, val = item.partition("=")
        if key == "pad":
            w["lo"] = [int(p.split("_")[0]) for p in val.split("x")]
        elif key in w:
            w[key] = [int(v) for v in val.split("x")]
    return w


def _valid_pairs(n_in: int, n_out: int, size: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read a real input element."""
    last = (n_in - 1) * lhs_dilate
    count = 0
    for o in range(n_out):
        for k in range(size):
            p = o * stride + k * rhs_dilate - lo
            if 0 <= p <= last and p % lhs_dilate == 0:
                count += 1
    return count


def analyse_hlo(text: str, stack_shapes: set[tuple[int, ...]] = frozenset(),
                frozen_stacks: set[tuple[str, tuple[int, ...]]] = frozenset()) -> dict[str, Any]:
    """FLOPs, collectives, TPU cycles and whole-stack copies inside loops of one optimized HLO module.

    ``stack_shapes``: per-device shapes of the stacked weight matrices (``[layers, in, out]``) and their optimizer
    moments; a copy of one of them inside a loop body is a whole layer stack copied in every iteration (the
    backward scan's gradient accumulators have these shapes too: small stacks such as LoRA's are copied).
    ``frozen_stacks``: ``(dtype, shape)`` of the frozen weight stacks, which must never be copied."""
    comps, entry = parse_hlo(text)
    mult, fused, trips = _multiplicities(comps, entry)
    shapes = {i.name: i.shape for body in comps.values() for i in body}
    flops = 0.0
    coll: dict[str, dict[str, float]] = {k: {"count": 0.0, "bytes": 0.0} for k in COLLECTIVES}
    cycles = 0.0
    by_op: dict[str, float] = defaultdict(float)
    stack_copies = {"count": 0.0, "bytes": 0.0, "frozen_count": 0.0, "frozen_bytes": 0.0}
    hbm = 0.0  # bytes read and written by the top-level instructions: every fusion reads its operands from HBM
    kernels = {"count": 0.0, "flops": 0.0}  # Pallas/Mosaic kernels: the TPU cost model gives them no cycles
    for name, body in comps.items():
        k = mult.get(name, 0.0)
        if not k:
            continue
        loop = trips.get(name)
        for ins in body:
            flops += k * _flops(ins, shapes)
            base = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if base in coll and not ins.opcode.endswith("-done"):
                out = _arrays(ins.shape)
                if base == "all-gather":
                    b = max((_nbytes([a]) for a in out), default=0)
                else:
                    ops = re.findall(r"%([^\s,)]+)", ins.text.split("(", 1)[1].split(")", 1)[0])
                    b = sum(_nbytes(_arrays(shapes.get(o, ""))) for o in ops)
                coll[base]["count"] += k
                coll[base]["bytes"] += k * b
            if name not in fused and ins.opcode not in _NO_TRAFFIC:
                ops = re.findall(r"%([^\s,)]+)", ins.text.split("(", 1)[1].split(")", 1)[0])
                hbm += k * (_nbytes(_arrays(ins.shape)) + sum(_nbytes(_arrays(shapes.get(o, ""))) for o in ops))
            if name not in fused:
                c = re.search(r'"estimated_cycles":"(\d+)"', ins.text)
                if c:
                    cycles += k * int(c.group(1))
                    by_op[_op_label(ins)] += k * int(c.group(1))
                elif ins.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in ins.text:
                    f = _kernel_flops(ins, shapes)
                    kernels["count"] += k
                    kernels["flops"] += k * f
            if loop and loop > 1 and ins.opcode in ("copy", "copy-start"):
                for arr in _arrays(ins.shape)[:1]:
                    if arr[1] in stack_shapes:  # a [layers, ...] stack copied in every iteration
                        stack_copies["count"] += k
                        stack_copies["bytes"] += k * _nbytes([arr])
                    if arr in frozen_stacks:
                        stack_copies["frozen_count"] += k
                        stack_copies["frozen_bytes"] += k * _nbytes([arr])
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"flops": flops, "hbm_bytes": hbm, "collectives": coll, "estimated_cycles": cycles, "stack_copies": stack_copies,
            "kernels": kernels,
            "top_ops_by_cycles": [(op, c / cycles if cycles else 0.0) for op, c in top],
            "loops": sorted(trips.values())}


# Matmuls of S x H per query row in each splash-attention kernel: forward (scores, probabilities x values),
# dq (scores again, dP, dS x K), dkv (scores again, dP, P^T x dO, dS^T x Q).
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
# The TPU compiler's cost model gives a Mosaic (Pallas) custom call no estimated cycles; such kernels are charged
# at this fraction of the chip's peak, counting every block (a causal mask's skipped blocks included). See
# docs/training.md#attention-kernels.
MOSAIC_EFFICIENCY = 0.5


def _kernel_flops(ins: Instr, shapes: dict[str, str]) -> float:
    """FLOPs of a splash-attention Pallas kernel from its operands (0 for other kernels, which are counted)."""
    m = re.match(r"splash_m[hq]a_(fwd|dq|dkv)", ins.name)
    if not m:
        return 0.0
    ops = re.findall(r"%([^\s,)]+)", ins.text.split("(", 1)[1].split(")", 1)[0])
    floats = [a for o in ops for a in _arrays(shapes.get(o, ""))
              if a[0] in ("bf16", "f16", "f32") and len(a[1]) >= 3]
    if len(floats) < 2:
        return 0.0
    q, k = floats[0][1], floats[1][1]  # q [..., N, T, H], then k [..., K, S, H]
    return 2.0 * _SPLASH_MATMULS[m.group(1)] * math.prod(q) * k[-2]


def _layer_counts(cfg: Config) -> set[int]:
    m = cfg.model
    return {m.encoder.num_layers, m.adapter.num_layers, m.llm.num_layers} - {1}


def _op_label(ins: Instr) -> str:
    """A short name of what an instruction computes (its jax op name when the metadata has one)."""
    m = re.search(r'op_name="([^"]+)"', ins.text)
    if not m:
        return ins.opcode
    parts = [p for p in m.group(1).split("/") if not p.startswith("jit(")]
    return f"{ins.opcode}: {'/'.join(parts[-3:])}"


# -- the report ---------------------------------------------------------------------------------------------------


def compile_plan(cfg: Config, target_spec: str, *, hlo_out: str | None = None) -> dict[str, Any]:
    """Compile ``cfg``'s train step for ``target_spec`` and report what the compiler says (per device)."""
    import jax

    from ..models.layers import as_dtype  # noqa: F401  (models import before the program)
    from .flops import train_step_flops
    from .mesh import build_mesh
    from .plan import plan as estimate
    from .step import TrainProgram

    target = parse_target(target_spec)
    devices = target_devices(target)
    mesh = build_mesh(cfg.train.mesh, devices)
    program = TrainProgram(cfg, mesh)
    shape = program.largest_batch()
    inputs = program.abstract_inputs(shape)
    import time

    t0 = time.perf_counter()
    compiled = program.lower(inputs).compile()
    compile_s = time.perf_counter() - t0
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
    n = target.devices
    chip = target.chip

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
    kernel_s = hlo["kernels"]["flops"] / (chip.peak_tflops * 1e12 * MOSAIC_EFFICIENCY)
    if chip.seconds_per_cycle and hlo["estimated_cycles"]:
        step_s, basis = hlo["estimated_cycles"] * chip.seconds_per_cycle + kernel_s, "TPU cost model"
        if hlo["kernels"]["count"]:
            basis += f" + Pallas kernels at {MOSAIC_EFFICIENCY:.0%} of peak"
    else:
        step_s = max(hlo["flops"] / (chip.peak_tflops * 1e12), hlo["hbm_bytes"] / (chip.hbm_tb_s * 1e12))
        basis = "roofline bound (FLOPs / peak, HBM bytes / bandwidth)"
    est = estimate(cfg, n, chip.hbm_gb, batch_shape=shape)
    from ..models.attention import impl_for

    attention = impl_for(cfg.model.attention_impl, devices[0].platform, cfg.model.dtype,
                         cfg.model.llm.resolved_head_dim)
    return {
        "target": target.spec, "devices": n, "mesh": dict(mesh.shape), "batch_shape": {"batch": b, "frames": t,
                                                                                      "prompt": p, "target": l_},
        "compile_seconds": compile_s, "attention": attention,
        "memory_bytes": memory,
        "hbm_bytes": chip.hbm_gb * GB,
        "headroom": 1.0 - total / (chip.hbm_gb * GB),
        "state_bytes": {"trainable": trainable_b, "optimizer": opt_b, "frozen_and_buffers": frozen_b,
                        "replicated_trainable": replicated_b},
        "hlo_flops": hlo["flops"],
        "hlo_hbm_bytes": hlo["hbm_bytes"],
        "model_flops": model_flops,
        "collectives": hlo["collectives"],
        "stack_copies": hlo["stack_copies"],
        "estimated_cycles": hlo["estimated_cycles"],
        "pallas_kernels": {"count": hlo["kernels"]["count"], "flops": hlo["kernels"]["flops"], "seconds": kernel_s},
        "top_ops_by_cycles": hlo["top_ops_by_cycles"],
        "step_seconds": step_s, "step_basis": basis,
        "tokens_per_second": (b * (math.ceil(t / 8) + p + 2 + l_)) / step_s if step_s else 0.0,
        "mfu": model_flops / step_s / (chip.peak_tflops * 1e12) if step_s else 0.0,
        "plan_estimate_bytes": est["per_device_GiB"]["total"] * 1024 ** 3,
    }


def format_report(r: dict[str, Any]) -> str:
    m = r["memory_bytes"]
    g = 1e9
    lines = [
        f"target {r['target']}: {r['devices']} devices, mesh {r['mesh']}, batch {r['batch_shape']} "
        f"(compiled in {r['compile_seconds']:.0f} s, attention {r.get('attention', '?')})",
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
    lines.append(f"step time {r['step_seconds'] * 1e3:.1f} ms ({r['step_basis']}); "
                 f"{r['tokens_per_second']:.0f} LLM tokens/s per device; MFU {r['mfu']:.1%}")
    if r["top_ops_by_cycles"]:
        lines.append("where the estimated cycles go:")
        lines += [f"  {share:6.1%}  {op}" for op, share in r["top_ops_by_cycles"]]
    return "\n".join(lines)
