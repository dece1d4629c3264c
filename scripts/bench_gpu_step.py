"""Run the compiled train step on the attached accelerator and put the measurement beside the compiler's figures.

``osum-train --plan --target`` and ``scripts/bench_aot.py`` judge the step by what the target compilers report
(memory, a roofline or cost-model step time). This script runs the same step for real: it builds
:class:`~osum_jax.train.step.TrainProgram` over the local devices (the function, shardings, donation, remat and
dtypes ``osum-train`` uses, for the largest bucket of the data config), compiles it once, fills the state with
random weights made on the devices (``init_state``: no checkpoint needed, 7.6 B frozen parameters included),
feeds random features and token ids at that bucket's full lengths, and times ``--steps`` steps after
``--warmup``. One JSON object on stdout (``--json-out`` writes it too), in one run side by side:

* ``compiler``: the report of :func:`osum_jax.perf.aot.compiled_report` for this very executable (memory, HLO
  FLOPs and bytes; on a GPU the two roofline bounds on the step time, whole-program and per-kernel, and the MFU
  bounds they give on the chip's datasheet peak);
* ``measured``: median / min step seconds, LLM tokens/s per device, MFU at the measured time (trainable-aware
  model FLOPs of ``flops.py`` / step time / datasheet peak), the device allocator's peak bytes, the losses;
* ``ratio``: measured step time / each bound (``step_vs_program_bound``, ``step_vs_per_kernel_bound``: at least 1
  where the bounds hold; on TPU ``step_vs_cost_model``), and measured peak memory / the compiler's total.

    # one H200, 8 x 29 s utterances (osum_full.yaml, bench_aot's settings for the GPU rows)
    python scripts/bench_gpu_step.py --per-device 8
    # CPU smoke (tests/test_bench_gpu_step.py): the tiny config, one step
    python scripts/bench_gpu_step.py --config configs/tiny.yaml --per-device 0 --steps 1 --warmup 0

``--per-device N`` sets the data budget to N 29 s utterances per device as bench_aot's rows do (0: keep the
config's budget); any ``key=value`` overrides follow, as for ``osum-train``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_aot import COMMON, PER_CHIP  # noqa: E402


def random_batch(program, shape, seed: int = 0) -> dict:
    """Random log-mel features and token ids at the bucket's full lengths (no padding: the most work)."""
    import jax
    import numpy as np

    b, t, p, l_ = shape
    rng = np.random.default_rng(seed)
    vocab = program.cfg.model.llm.vocab_size
    host = {"feats": rng.standard_normal((b, t, program.cfg.model.encoder.num_mel_bins), dtype=np.float32),
            "feats_lengths": np.full((b,), t, np.int32),
            "prompt": rng.integers(0, vocab, (b, p), dtype=np.int32), "prompt_lengths": np.full((b,), p, np.int32),
            "target": rng.integers(0, vocab, (b, l_), dtype=np.int32), "target_lengths": np.full((b,), l_, np.int32)}
    return {k: jax.device_put(v, program.batch_shardings[k]) for k, v in host.items()}


def measure(cfg, *, steps: int, warmup: int, hlo_out: str | None = None) -> dict:
    import jax

    from osum_jax.models.layers import as_dtype  # noqa: F401  (models import before the program)
    from osum_jax.perf.aot import chip_of, compiled_report, llm_tokens
    from osum_jax.train.mesh import build_mesh
    from osum_jax.train.step import TrainProgram

    devices = jax.devices()
    mesh = build_mesh(cfg.train.mesh, devices)
    program = TrainProgram(cfg, mesh)
    shape = program.largest_batch()
    inputs = program.abstract_inputs(shape)
    t0 = time.perf_counter()
    compiled = program.lower(inputs).compile()
    compile_s = time.perf_counter() - t0
    chip = chip_of(devices[0])
    report = compiled_report(cfg, inputs, compiled, chip, f"{devices[0].platform}:{devices[0].device_kind}",
                             len(devices), devices[0].platform, compile_s, hlo_out=hlo_out,
                             mesh_shape=dict(mesh.shape), rng_impl=program.rng_impl)

    t0 = time.perf_counter()
    trainable, frozen, buffers = program.init_state()
    opt_state = program.init_opt(trainable)
    batch = random_batch(program, shape)
    jax.block_until_ready((trainable, frozen, buffers, opt_state, batch))
    init_s = time.perf_counter() - t0

    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, buffers, batch,
                                                 program.dropout_key(i))
        loss = float(jax.block_until_ready(metrics["loss"]))  # the step's outputs are ready with it
        jax.block_until_ready((trainable, opt_state))
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    stats = devices[0].memory_stats() or {}
    step_s = statistics.median(times)
    peak = chip.peak_tflops * 1e12 if chip else 0.0
    tokens = llm_tokens(shape) / len(devices)
    measured = {"step_seconds_median": step_s, "step_seconds_min": min(times), "steps": len(times),
                "warmup": warmup, "init_seconds": init_s, "losses": losses,
                "all_finite": all(x == x and abs(x) != float("inf") for x in losses),
                "tokens_per_second": tokens / step_s,
                "mfu": report["model_flops"] / step_s / peak if peak else 0.0,
                "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit")}
    ratio = {"step_vs_program_bound": _ratio(step_s * 1e3, report.get("step_ms_bound_program")),
             "step_vs_per_kernel_bound": _ratio(step_s * 1e3, report.get("step_ms_bound_per_kernel")),
             "step_vs_cost_model": _ratio(step_s, report.get("step_seconds")),
             "peak_memory_vs_compiler_total": (stats["peak_bytes_in_use"] / report["memory_bytes"]["total"]
                                               if stats.get("peak_bytes_in_use") else None)}
    return {"jax": jax.__version__, "device_kind": devices[0].device_kind, "devices": len(devices),
            "chip": chip.name if chip else None, "compiler": report, "measured": measured, "ratio": ratio}


def _ratio(measured: float, predicted: float | None) -> float | None:
    return measured / predicted if predicted else None


def compiler_summary(c: dict) -> str:
    """The compiler's step figures as they are: bounds (GPU), the TPU cost model's estimate, or none (CPU)."""
    if "mfu_bound_program" in c:
        return (f"compiler roofline bounds: step >= {c['step_ms_bound_program']:.1f} ms whole-program "
                f"(MFU <= {c['mfu_bound_program']:.1%}), >= {c['step_ms_bound_per_kernel']:.1f} ms per-kernel "
                f"(MFU <= {c['mfu_bound_per_kernel']:.1%})")
    if "mfu" in c:
        return f"TPU cost model {c['step_seconds'] * 1e3:.1f} ms (MFU {c['mfu']:.1%})"
    return f"compiler: no step figure ({c['step_basis']})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/osum_full.yaml"))
    ap.add_argument("--per-device", type=int, default=8, help="29 s utterances per device (0: the config's budget)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json-out", default="")
    ap.add_argument("--hlo-out", default="")
    ap.add_argument("--no-common", action="store_true", help="leave out bench_aot's COMMON settings (bf16 ...)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)

    import jax

    from osum_jax.config_loading import load_config

    n = len(jax.devices())
    overrides = ([] if args.no_common else list(COMMON)) + [f"train.mesh.data={n}", "train.mesh.fsdp=1"]
    if args.per_device:
        overrides += PER_CHIP(args.per_device, chips=n)
    overrides += args.overrides
    cfg = load_config(args.config, overrides)
    out = measure(cfg, steps=args.steps, warmup=args.warmup, hlo_out=args.hlo_out or None)
    out["overrides"] = overrides
    text = json.dumps(out, default=float)
    print(text, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    m, c = out["measured"], out["compiler"]
    print(f"# {out['device_kind']} x{out['devices']}, batch {c['batch_shape']}, attention {c['attention']}: "
          f"measured {m['step_seconds_median'] * 1e3:.1f} ms/step (MFU {m['mfu']:.1%}), {compiler_summary(c)}; "
          f"memory: compiler {c['memory_bytes']['total'] / 1e9:.1f}"
          f" GB, allocator peak {(m['peak_bytes_in_use'] or 0) / 1e9:.1f} GB; compile {c['compile_seconds']:.0f} s",
          file=sys.stderr)
    return 0 if m["all_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
