"""Optimized HLO text analysis for ``osum-train --plan --target`` (:mod:`osum_jax.perf.aot`).

What XLA reports itself is taken from XLA; what it cannot give is read from the optimized HLO module text:

=============================  ==================================  ==============================================
figure                         from                                why
=============================  ==================================  ==============================================
memory per device              ``compiled.memory_analysis()``      XLA's buffer assignment (``aot.py``)
HBM bytes, loop-free program   ``compiled.cost_analysis()``        ``bytes accessed``: the same figure as the text
                               (:func:`xla_cost_analysis`)         count when no loop runs (tested)
HBM bytes, with loops          the HLO text (:func:`analyse_hlo`)  ``cost_analysis`` counts a loop body once; the
                                                                   step is a scan over layers (trip counts here)
FLOPs of dots / convolutions   the HLO text                        the same: loop bodies once; ``cost_analysis``'s
                                                                   ``flops`` also counts elementwise ops, and no
                                                                   custom call (cuBLAS GEMMs, Pallas/Triton
                                                                   kernels) at all
collectives by kind, bytes     the HLO text                        ``cost_analysis`` has no per-collective figures
per-kernel FLOPs and bytes     the HLO text                        XLA reports whole-program sums only; the
                                                                   per-kernel roofline bound needs each kernel
TPU ``estimated_cycles``       the HLO text (backend_config)       the cost model's cycles are only printed there
stack copies inside loops      the HLO text                        a layout question XLA does not report
=============================  ==================================  ==============================================

:func:`analyse_hlo` counts, per device and step, with loop trip counts applied:

* FLOPs of dots and convolutions (convolutions as XLA:TPU writes batched matmuls count only the window taps that
  read real input elements), of XLA:GPU's cuBLAS GEMMs and of the Pallas (Triton) flash-attention kernels;
* collectives by kind with their bytes;
* HBM bytes read and written by the top-level instructions (every fusion reads its operands from HBM);
* each kernel's FLOPs and HBM bytes (``kernel_costs``: every top-level instruction that runs as a kernel, a
  fusion's FLOPs counted from its fused computation), for the per-kernel roofline bound of :func:`roofline_bounds`;
* the TPU cost model's ``estimated_cycles`` and which ops they go to;
* Pallas (Mosaic) kernels, which the cost model gives no cycles, with the FLOPs of splash attention's kernels;
* whole layer-stack copies inside loop bodies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
_COMP = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# asynchronous operations (collectives, copies, send/recv) run beside the kernels of the compute stream, not one
# after another with them: the per-kernel bound leaves them out (the whole-program bound counts their bytes)
_ASYNC = {"send", "recv", "send-done", "recv-done"}


def xla_cost_analysis(compiled) -> dict[str, float]:
    """XLA's own whole-program figures (``compiled.cost_analysis()``): ``flops`` (every op, elementwise ones too;
    custom calls not at all), ``transcendentals`` and ``bytes_accessed``, each loop body counted once. Empty when
    the backend reports none."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends/plugins do not implement it
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = dict(ca or {})
    out = {k: float(ca[k]) for k in ("flops", "transcendentals") if k in ca}
    if "bytes accessed" in ca:
        out["bytes_accessed"] = float(ca["bytes accessed"])
    return out


def _is_async(opcode: str) -> bool:
    return opcode in _ASYNC or opcode.endswith(("-start", "-done", "-update"))


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


def _operands(ins: Instr) -> list[str]:
    return re.findall(r"%([^\s,)]+)", ins.text.split("(", 1)[1].split(")", 1)[0])


def _traffic(ins: Instr, shapes: dict[str, str], comps: dict[str, list[Instr]]) -> float:
    """HBM bytes one top-level instruction reads and writes: its operands and outputs, except that a slice taken
    with ``dynamic-slice`` reads only the slice, and a buffer updated in place by ``dynamic-update-slice`` moves
    only the update (a scan's per-layer weight slices and its stacked residuals are not whole-stack traffic)."""
    ops = _operands(ins)
    if ins.opcode == "dynamic-slice":
        return 2 * _nbytes(_arrays(ins.shape))
    if ins.opcode == "dynamic-update-slice":
        return 2 * _nbytes(_arrays(shapes.get(ops[1], ""))) if len(ops) > 1 else 0.0
    read = [_nbytes(_arrays(shapes.get(o, ""))) for o in ops]
    write = _nbytes(_arrays(ins.shape))
    called = re.search(r"calls=%([^\s,)]+)", ins.text) if ins.opcode == "fusion" else None
    body = comps.get(called.group(1), []) if called else []
    if body:
        params = {i.name: int(m.group(1)) for i in body if (m := re.match(r"parameter\((\d+)\)", i.text))}
        users: dict[str, list[Instr]] = defaultdict(list)
        for i in body:
            for o in _operands(i) if "(" in i.text else ():
                users[o].append(i)
        for pname, idx in params.items():
            us = users.get(pname, [])
            if idx >= len(read) or not us:
                continue
            if all(u.opcode == "dynamic-slice" and _operands(u)[0] == pname for u in us):
                read[idx] = sum(_nbytes(_arrays(u.shape)) for u in us)
            elif all(u.opcode == "dynamic-update-slice" and _operands(u)[0] == pname for u in us):
                update = sum(_nbytes(_arrays(shapes.get(_operands(u)[1], ""))) for u in us)
                read[idx] = 0.0  # updated in place: only the update is written
                write -= _nbytes(_arrays(shapes.get(pname, ""))) - update
    return sum(read) + max(write, 0.0)


def _trip_count(instr: Instr, comps: dict[str, list[Instr]], caller: list[Instr] | None = None) -> int:
    """Iterations of a ``while``: XLA's ``known_trip_count`` when it gives one, else read off the loop: the
    condition's ``i < N`` on a tuple element, that element's start in the init tuple (``caller``, the computation
    holding the while; 0 when it is not a constant) and its step in the body's root tuple (1 unless a constant is
    added: XLA:TPU's windowed einsums step by 2 with ``i < 8`` for 4 iterations)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.text)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%([^\s,]+)", instr.text)
    body = comps.get(cond.group(1), []) if cond else []
    consts = {i.name: c for i in body if (c := _int_constant(i)) is not None}
    gtes = {i.name: int(g.group(1)) for i in body
            if i.opcode == "get-tuple-element" and (g := re.search(r"index=(\d+)", i.text))}
    for i in body:  # i < N (how scans and XLA's own loops lower)
        if i.opcode == "compare" and "direction=LT" in i.text:
            ops = _operands(i)
            if len(ops) == 2 and ops[1] in consts:
                limit, index = consts[ops[1]], gtes.get(ops[0])
                start, step = _loop_start(instr, caller, index), _loop_step(instr, comps, index)
                return max(0, -(-(limit - start) // step))
    return 1


def _loop_step(instr: Instr, comps, index: int | None) -> int:
    """The constant the body adds to tuple element ``index`` (1 when it is not ``gte(param, index) + c``)."""
    m = re.search(r"body=%([^\s,]+)", instr.text)
    body = comps.get(m.group(1), []) if m else []
    if index is None or not body:
        return 1
    by = {i.name: i for i in body}
    ops = _operands(body[-1]) if body[-1].opcode == "tuple" else []
    upd = by.get(ops[index]) if index < len(ops) else None
    if upd is None or upd.opcode != "add":
        return 1
    vals = [by.get(o) for o in _operands(upd)]
    steps = [c for v in vals if v is not None and (c := _int_constant(v)) is not None]
    reads = any(v is not None and v.opcode == "get-tuple-element" and f"index={index}" in v.text for v in vals)
    return steps[0] if reads and len(steps) == 1 and steps[0] > 0 else 1


def _loop_start(instr: Instr, caller: list[Instr] | None, index: int | None) -> int:
    """Tuple element ``index`` of the while's init tuple when it is a constant, else 0."""
    if index is None or not caller:
        return 0
    by = {i.name: i for i in caller}
    init = by.get((_operands(instr) or [""])[0])
    ops = _operands(init) if init is not None and init.opcode == "tuple" else []
    v = by.get(ops[index]) if index < len(ops) else None
    c = _int_constant(v) if v is not None else None
    return c if c is not None else 0


def _int_constant(ins: Instr) -> int | None:
    """The value of an integer scalar ``constant``, else None."""
    c = re.match(r"constant\((-?\d+)\)", ins.text) if ins.opcode == "constant" else None
    return int(c.group(1)) if c else None


def _cycles(ins: Instr) -> int | None:
    """The TPU cost model's ``estimated_cycles`` of a top-level instruction, None where it gives none."""
    c = re.search(r'"estimated_cycles":"(\d+)"', ins.text)
    return int(c.group(1)) if c else None


def _branches(ins: Instr) -> list[str]:
    """The branch computations of a ``conditional`` instruction (either spelling)."""
    m = re.search(r"branch_computations=\{([^}]*)\}", ins.text)
    if m:
        return [b.strip().lstrip("%") for b in m.group(1).split(",")]
    return re.findall(r"(?:true_computation|false_computation)=%([^\s,]+)", ins.text)


def _weight(name: str, comps, shapes, memo: dict[str, float]) -> float:
    """What one run of a computation costs, to pick a conditional's dearest branch: the TPU cost model's cycles
    where instructions carry them, FLOPs plus output bytes otherwise; loops times their trip counts, calls once,
    a nested conditional its dearest branch."""
    if name in memo:
        return memo[name]
    memo[name] = 0.0  # call graphs are DAGs; this only guards against malformed text
    total = 0.0
    for ins in comps.get(name, []):
        c = _cycles(ins)
        total += c if c is not None else _flops(ins, shapes) + _nbytes(_arrays(ins.shape))
        if ins.opcode == "while":
            m = re.search(r"body=%([^\s,]+)", ins.text)
            if m:
                total += _trip_count(ins, comps, comps.get(name)) * _weight(m.group(1), comps, shapes, memo)
        elif ins.opcode == "conditional":
            total += max((_weight(b, comps, shapes, memo) for b in _branches(ins)), default=0.0)
        elif ins.opcode != "fusion":
            for m in re.finditer(r"calls=%([^\s,]+)", ins.text):
                total += _weight(m.group(1), comps, shapes, memo)
    memo[name] = total
    return total


def _multiplicities(comps, entry) -> tuple[dict[str, float], set[str], dict[str, int]]:
    """How many times each computation runs per step; which are fusion bodies; loop trip counts by body.

    A conditional runs one branch per execution: only its dearest branch (:func:`_weight`) is counted, so a
    step's report is what its most expensive path costs (the optimizer's update-or-hold ``cond`` under gradient
    accumulation would otherwise be charged both)."""
    mult: dict[str, float] = defaultdict(float)
    fused: set[str] = set()
    trips: dict[str, int] = {}
    shapes = {i.name: i.shape for body in comps.values() for i in body}
    memo: dict[str, float] = {}
    mult[entry] = 1.0
    order = [entry]
    seen = {entry}
    while order:
        name = order.pop()
        for ins in comps.get(name, []):
            edges = []
            if ins.opcode == "while":
                n = _trip_count(ins, comps, comps.get(name))
                for key in ("body", "condition"):
                    m = re.search(key + r"=%([^\s,]+)", ins.text)
                    if m:
                        edges.append((m.group(1), n))
                        if key == "body":
                            trips[m.group(1)] = n
            for m in re.finditer(r"calls=%([^\s,]+)", ins.text):
                edges.append((m.group(1), 1))
                if ins.opcode == "fusion":
                    fused.add(m.group(1))
            if ins.opcode == "conditional":
                branches = _branches(ins)
                if branches:
                    edges.append((max(branches, key=lambda b: _weight(b, comps, shapes, memo)), 1))
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
    operands = _operands(ins)
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
    if ins.opcode == "custom-call" and 'custom_call_target="__gpu$xla.gpu.triton"' in ins.text:
        # the Pallas (Triton) flash-attention kernels: q [B, T, N, H], k [B, S, N, H]; the forward runs two
        # T x S x H products per head (scores, probabilities x values), the backward five (scores again, dP, dV,
        # dQ, dK); other Triton kernels (the backward's preprocessing) are elementwise
        m = re.search(r'op_name="[^"]*mha_(forward|backward)[^"]*pallas_call"', ins.text)
        ops = [_arrays(shapes.get(o, "")) for o in operands[:2]]
        if not m or not all(ops) or len(ops[0][0][1]) != 4:
            return 0.0
        q, k = ops[0][0][1], ops[1][0][1]
        return 2.0 * (2 if m.group(1) == "forward" else 5) * math.prod(q) * k[1]
    if ins.opcode == "custom-call" and re.search(r'custom_call_target="__cublas\$(lt\$matmul|gemm)"', ins.text):
        # XLA:GPU's library GEMMs: output (first tuple element; the second is cuBLAS workspace) x contraction
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.text)
        lhs = _arrays(shapes.get(operands[0], "")) if operands else []
        if not m or not lhs:
            return 0.0
        k = math.prod(lhs[0][1][int(d.strip('" '))] for d in m.group(1).split(",") if d.strip('" '))
        return 2.0 * n_out * k
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
    kernel_costs: list[tuple[float, float, float, str]] = []  # (runs per step, FLOPs, HBM bytes, label) per kernel
    fusion_memo: dict[str, float] = {}
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
                    ops = _operands(ins)
                    b = sum(_nbytes(_arrays(shapes.get(o, ""))) for o in ops)
                coll[base]["count"] += k
                coll[base]["bytes"] += k * b
            if ins.opcode == "send" and "_xla_megascale_transfer_type=" in ins.text:
                # multi-slice: XLA:TPU hands the data-centre-network part of a collective to the megascale
                # runtime as a host send (the ICI part stays a collective within the slice)
                kind = "dcn " + re.search(r'_xla_megascale_transfer_type="([^"]+)"', ins.text)[1].lower()
                b = sum(_nbytes(_arrays(shapes.get(o, ""))) for o in _operands(ins)[:1])
                entry_ = coll.setdefault(kind, {"count": 0.0, "bytes": 0.0})
                entry_["count"] += k
                entry_["bytes"] += k * b
            if name not in fused and ins.opcode not in _NO_TRAFFIC:
                moved = _traffic(ins, shapes, comps)
                hbm += k * moved
                if not _is_async(ins.opcode):
                    work = _flops(ins, shapes) + _fusion_flops(ins, comps, shapes, fusion_memo)
                    if ins.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in ins.text:
                        work += _kernel_flops(ins, shapes)
                    kernel_costs.append((k, work, moved, _op_label(ins)))
            if name not in fused:
                c = _cycles(ins)
                if c is not None:
                    cycles += k * c
                    by_op[_op_label(ins)] += k * c
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
            "kernels": kernels, "kernel_costs": kernel_costs,
            "top_ops_by_cycles": [(op, c / cycles if cycles else 0.0) for op, c in top],
            "loops": sorted(trips.values())}


def _fusion_flops(ins: Instr, comps, shapes, memo: dict[str, float]) -> float:
    """FLOPs of one run of a ``fusion`` instruction: those of its fused computation, nested fusions included (0 for
    other instructions)."""
    if ins.opcode != "fusion":
        return 0.0
    m = re.search(r"calls=%([^\s,)]+)", ins.text)
    if not m:
        return 0.0
    name = m.group(1)
    if name not in memo:
        memo[name] = 0.0  # guards against malformed (cyclic) text
        memo[name] = sum(_flops(i, shapes) + _fusion_flops(i, comps, shapes, memo) for i in comps.get(name, []))
    return memo[name]


def roofline_bounds(hlo: dict[str, Any], peak_flops: float, bytes_per_s: float, top: int = 12) -> dict[str, Any]:
    """Two lower bounds on the step time of an analysed program (:func:`analyse_hlo`) on a chip with
    ``peak_flops`` FLOP/s and ``bytes_per_s`` of HBM bandwidth, neither a prediction:

    * ``program_seconds``: ``max(all FLOPs / peak, all HBM bytes / bandwidth)``, as if every FLOP ran at peak while
      every byte moved at full bandwidth, overlapped across the whole step;
    * ``per_kernel_seconds``: the kernels run one after another, each taking at least
      ``max(its FLOPs / peak, its HBM bytes / bandwidth)``, summed with the loop trip counts (asynchronous
      collectives and copies, which overlap the kernels, are left out; their bytes are in the whole-program bound).

    FLOPs and bytes are :func:`analyse_hlo`'s (dots, convolutions, library GEMMs and attention kernels; each
    operand read once from HBM and each output written once). ``top_kernels``: the kernels with the largest share
    of the per-kernel bound, summed by label."""
    program = max((hlo["flops"] + hlo["kernels"]["flops"]) / peak_flops, hlo["hbm_bytes"] / bytes_per_s)
    by_label: dict[str, float] = defaultdict(float)
    per_kernel = 0.0
    for k, f, b, label in hlo["kernel_costs"]:
        t = k * max(f / peak_flops, b / bytes_per_s)
        per_kernel += t
        by_label[label] += t
    ranked = sorted(by_label.items(), key=lambda kv: -kv[1])[:top]
    return {"program_seconds": program, "per_kernel_seconds": per_kernel,
            "top_kernels": [(label, t / per_kernel if per_kernel else 0.0) for label, t in ranked]}


# Matmuls of S x H per query row in each splash-attention kernel: forward (scores, probabilities x values),
# dq (scores again, dP, dS x K), dkv (scores again, dP, P^T x dO, dS^T x Q).
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _kernel_flops(ins: Instr, shapes: dict[str, str]) -> float:
    """FLOPs of a splash-attention Pallas kernel from its operands (0 for other kernels, which are counted)."""
    m = re.match(r"splash_m[hq]a_(fwd|dq|dkv)", ins.name)
    if not m:
        return 0.0
    ops = _operands(ins)
    floats = [a for o in ops for a in _arrays(shapes.get(o, ""))
              if a[0] in ("bf16", "f16", "f32") and len(a[1]) >= 3]
    if len(floats) < 2:
        return 0.0
    q, k = floats[0][1], floats[1][1]  # q [..., N, T, H], then k [..., K, S, H]
    return 2.0 * _SPLASH_MATMULS[m.group(1)] * math.prod(q) * k[-2]


def _op_label(ins: Instr) -> str:
    """A short name of what an instruction computes (its jax op name when the metadata has one)."""
    m = re.search(r'op_name="([^"]+)"', ins.text)
    if not m:
        return ins.opcode
    parts = [p for p in m.group(1).split("/") if not p.startswith("jit(")]
    return f"{ins.opcode}: {'/'.join(parts[-3:])}"
