"""``osum-train --plan``: the per-device memory estimate, the compile report for a TPU/GPU target, and the
per-device budget x accumulation for a recipe's global batch. Called by :mod:`osum_jax.train.cli` (the CLI layer);
the trainer itself never imports :mod:`osum_jax.perf`."""

from __future__ import annotations

import json
import os
import sys

from ..config import ConfigError


def run_plan(cfg, args) -> int:
    """``osum-train --plan`` with the parsed ``args`` (``--target``, ``--global-frames``, ``--bucket``, ``--json``,
    ``--hlo-out``, ``--devices``, ``--device-memory-gb``) for the resolved ``cfg``; the exit status."""
    if args.target:  # compiling for a topology needs no accelerator backend on this host
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        if args.global_frames:
            return _plan_recipe(cfg, args)
        if args.target:
            from .aot import MissingCompiler, compile_plan, format_report

            try:
                report = compile_plan(cfg, args.target, hlo_out=args.hlo_out or None, bucket=args.bucket_shape)
            except MissingCompiler as e:
                print(f"osum-train: {e}", file=sys.stderr)
                return 2
            print(json.dumps(report, indent=1) if args.json else format_report(report))
        else:
            from .plan import format_plan, plan

            p = plan(cfg, args.devices or None, args.device_memory_gb)
            print(json.dumps(p, indent=1) if args.json else format_plan(p))
    except ConfigError as e:
        print(f"osum-train: config error: {e}", file=sys.stderr)
        return 2
    return 0


def _plan_recipe(cfg, args) -> int:
    """``--plan --global-frames N``: the per-device budget x accumulation for a recipe's global batch."""
    from .plan import format_proposal, propose_recipe

    if args.target:
        from .aot import parse_target

        target = parse_target(args.target)
        n, mem, platform = target.devices, target.chip.hbm_gb, {"tpu": "tpu", "cuda": "gpu"}[target.chip.platform]
    else:
        if not args.devices or not args.device_memory_gb:
            print("osum-train: --global-frames needs --target, or --devices and --device-memory-gb",
                  file=sys.stderr)
            return 2
        n, mem, platform = args.devices, args.device_memory_gb, None
    p = propose_recipe(cfg, n, mem, args.global_frames, platform=platform)
    base = " ".join(["osum-train", *([args.config] if args.config else []),
                     *([f"--osum-config {args.osum_config}"] if args.osum_config else []), *args.overrides])
    if not args.target or p["proposal"] is None:
        print(json.dumps(p, indent=1) if args.json else format_proposal(p, base))
        return 0 if p["proposal"] is not None else 1
    from .aot import MissingCompiler, compile_plan, format_report
    from .plan import recipe_config

    chosen = recipe_config(cfg, p["data_parallel"], p["proposal"]["grad_accum"], args.global_frames)
    try:
        report = compile_plan(chosen, args.target, hlo_out=args.hlo_out or None, bucket=args.bucket_shape)
    except MissingCompiler as e:
        print(f"osum-train: {e}", file=sys.stderr)
        return 2
    report["proposal"] = p
    print(json.dumps(report, indent=1) if args.json else format_proposal(p, base) + "\n" + format_report(report))
    return 0
