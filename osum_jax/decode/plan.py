"""``osum-decode --plan --target``: the decode program compiled for a pod target on this host, and what the
compiler says about it (per device): memory, the TPU cost model's time for one batch, and tokens per second.

The program is compiled with a loop of exactly ``max_new_tokens`` steps (``stop_early=False``: a known trip count,
so the cost model counts every step; a real run stops when every row has ended), over one batch of
``batch_per_device`` utterances per data-parallel device of ``frames`` frames and a ``prompt``-token prompt.
tokens/s is the output tokens of that batch (every row running the whole loop) over its estimated time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

GB = 1e9


def _config(path: str, overrides: Sequence[str], step: int | None):
    if Path(path).suffix in (".yaml", ".yml"):
        from ..config_loading import load_config

        return load_config(path, overrides)
    from ..checkpoint import read_config

    return read_config(path, step, overrides)


def compile_decode_plan(path: str, overrides: Sequence[str], target_spec: str, decoding, *,
                        batch_per_device: int = 8, frames: int = 3000, prompt: int = 64,
                        step: int | None = None) -> dict[str, Any]:
    from ..perf.aot import MOSAIC_EFFICIENCY, parse_target, target_devices
    from ..perf.hlo import analyse_hlo
    from ..train.mesh import build_mesh
    from .program import DecodeProgram

    cfg = _config(path, overrides, step)
    target = parse_target(target_spec)
    devices = target_devices(target)
    mesh = build_mesh(cfg.train.mesh, devices)
    # the end-of-text id is a constant of the program; its value does not change the compiled work
    program = DecodeProgram(cfg, mesh, decoding, cfg.model.llm.vocab_size - 1, batch_per_device=batch_per_device,
                            frame_buckets=(frames,), stop_early=False)
    t_frames, t_prompt = program.bucket(frames, prompt)
    t0 = time.perf_counter()
    compiled = program.lower(t_frames, t_prompt).compile()
    compile_s = time.perf_counter() - t0
    hlo = analyse_hlo(compiled.as_text())
    mem = compiled.memory_analysis()
    memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
              "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
              "generated_code": mem.generated_code_size_in_bytes}
    memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    chip = target.chip
    n = len(devices)
    report: dict[str, Any] = {
        "target": target.spec, "devices": n, "mesh": dict(mesh.shape),
        "decoding": decoding.method, "num_beams": decoding.num_beams if decoding.method == "beam" else 1,
        "max_new_tokens": decoding.max_new_tokens,
        "batch": {"rows": program.rows, "per_device": batch_per_device, "frames": t_frames, "prompt": t_prompt},
        "dtype": cfg.model.dtype, "frozen_param_dtype": cfg.train.frozen_param_dtype,
        "compile_seconds": compile_s, "memory_bytes": memory, "hbm_bytes": chip.hbm_gb * GB,
        "headroom": 1.0 - memory["total"] / (chip.hbm_gb * GB),
        "hlo_flops": hlo["flops"], "estimated_cycles": hlo["estimated_cycles"],
        "top_ops_by_cycles": hlo["top_ops_by_cycles"][:6],
    }
    if chip.seconds_per_cycle and hlo["estimated_cycles"]:
        kernel_s = hlo["kernels"]["flops"] / (chip.peak_tflops * 1e12 * MOSAIC_EFFICIENCY)
        batch_s = hlo["estimated_cycles"] * chip.seconds_per_cycle + kernel_s
        out_tokens = program.rows * decoding.max_new_tokens
        report.update(basis="TPU cost model" + (f" + Pallas kernels at {MOSAIC_EFFICIENCY:.0%} of peak"
                                                if hlo["kernels"]["count"] else ""),
                      batch_seconds=batch_s, tokens_per_second=out_tokens / batch_s,
                      utterances_per_second=program.rows / batch_s)
    else:
        report["basis"] = "no cost model for this target (memory only)"
    return report


def format_decode_report(r: dict[str, Any]) -> str:
    m = r["memory_bytes"]
    lines = [f"osum-decode on {r['target']} ({r['devices']} devices, mesh {r['mesh']}): {r['decoding']}"
             + (f" ({r['num_beams']} beams)" if r["num_beams"] > 1 else "")
             + f", {r['batch']['rows']} rows of {r['batch']['frames']} frames + {r['batch']['prompt']} prompt "
               f"tokens, {r['max_new_tokens']} new tokens",
             f"  memory / device: {m['total'] / GB:.2f} GB (args {m['arguments'] / GB:.2f}, temp "
             f"{m['temporaries'] / GB:.2f}); headroom {r['headroom']:.0%}; compiled in {r['compile_seconds']:.0f} s"]
    if "batch_seconds" in r:
        lines.append(f"  one batch: {r['batch_seconds'] * 1e3:.0f} ms ({r['basis']}): {r['tokens_per_second']:,.0f} "
                     f"output tokens/s, {r['utterances_per_second']:.1f} utterances/s")
    else:
        lines.append(f"  {r['basis']}")
    return "\n".join(lines)
