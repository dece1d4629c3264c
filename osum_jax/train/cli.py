"""``osum-train CONFIG [key=value ...]``: train (or ``--plan`` the memory of) an OSUM model.

    osum-train configs/tiny.yaml data.train=corpus/train.list data.tokenizer=tok/ train.output_dir=runs/x
    osum-train configs/osum_full.yaml --plan --devices 8 --device-memory-gb 80
    osum-train --osum-config OSUM/conf/config_llm_huawei_base-version.yaml data.train=train.list \
        data.tokenizer=qwen2/ train.init_from=ckpt/osum     # OSUM's own recipe (its prompts from beside it)
    osum-train --osum-config OSUM/conf/config_llm_huawei_base-version.yaml --print-config

Multi-host: set ``train.distributed.coordinator_address/num_processes/process_id`` (or the environment
variables ``OSUM_COORDINATOR``, ``OSUM_NUM_PROCESSES``, ``OSUM_PROCESS_ID``) and start one process per host;
each process reads its own share of the data. Under SLURM (several tasks), Open MPI (several ranks) or on a
multi-host TPU slice none of them is needed: ``jax.distributed.initialize()`` is called and JAX reads the set-up
from the cluster (``train.distributed.auto=false`` turns this off).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def detected_cluster(env=os.environ) -> str:
    """Which multi-process launcher started this process, from its environment (``""`` for none): a SLURM job
    step with several tasks, Open MPI with several ranks, or a TPU slice with several hosts. These are the
    clusters ``jax.distributed.initialize()`` configures by itself; a single process must not call it."""
    def count(name):
        try:
            return int(env.get(name, "0").split("(")[0])
        except ValueError:
            return 0

    if count("SLURM_STEP_NUM_TASKS") > 1 or count("SLURM_NTASKS") > 1:
        return "SLURM"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
        return "TPU slice"
    return ""


def _init_distributed(cfg) -> None:
    import jax

    d = cfg.train.distributed
    addr = d.coordinator_address or os.environ.get("OSUM_COORDINATOR", "")
    nproc = d.num_processes or int(os.environ.get("OSUM_NUM_PROCESSES", "0"))
    pid = d.process_id if d.process_id >= 0 else int(os.environ.get("OSUM_PROCESS_ID", "-1"))
    cluster = detected_cluster() if d.auto else ""
    if addr:
        jax.distributed.initialize(addr, num_processes=nproc or None, process_id=pid if pid >= 0 else None)
    elif nproc > 1 or cluster:
        logging.getLogger(__name__).info("jax.distributed.initialize() with auto-detection (%s)",
                                         cluster or f"{nproc} processes")
        jax.distributed.initialize()  # JAX reads the coordinator, process count and id from the cluster


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path``: a restarted or repeated run loads its compiled steps
    instead of compiling them again (the key covers the program, shardings, devices and jax/XLA versions).
    Must run before the first compilation in the process."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# XLA:GPU defaults of osum-train (a flag the user already sets in XLA_FLAGS wins). Triton GEMM fusions: with
# four 29 s utterances per H100 the compiler stops at the adapter's [1452, 1024] matmul ("Couldn't find output
# tile sizes that satisfy hlo", jax-cuda12-plugin as pinned); with cuBLAS GEMMs the step compiles (MaxText's GPU
# recipes turn Triton GEMMs off too). The flag only concerns XLA:GPU, so it is set before any backend starts.
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def apply_gpu_xla_defaults(env=os.environ) -> None:
    flags = env.get("XLA_FLAGS", "")
    extra = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        env["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


DEFAULT_BASE = Path(__file__).resolve().parents[2] / "configs" / "osum_full.yaml"


def resolve_config(args):
    """The run's config: ``CONFIG`` + overrides, or ``--osum-config``'s recipe on ``CONFIG`` (default
    configs/osum_full.yaml where the checkout has it, else the built-in defaults, which are OSUM's); ``--prompts``
    sets ``data.prompts``. Raises ``ConfigError`` (one line for the user)."""
    import yaml

    from ..config import ConfigError

    from ..config_loading import load_config

    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # `--osum-config X key=value ...`
    overrides = list(args.overrides)
    if args.prompts:
        overrides.append(f"data.prompts={args.prompts}")
    if not args.osum_config:
        if args.allow_default_prompts:
            raise ConfigError("--allow-default-prompts goes with --osum-config")
        if args.config is None:
            raise ConfigError("give a config (configs/*.yaml) or --osum-config OSUM_YAML")
        return load_config(args.config, overrides)
    from ..osum_recipe import config_from_recipe, describe, read_recipe

    recipe = read_recipe(args.osum_config)
    base_path = Path(args.config) if args.config else (DEFAULT_BASE if DEFAULT_BASE.is_file() else None)
    base = {}
    if base_path is not None:
        try:
            base = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{base_path}: cannot read ({e})") from None
    if recipe.prompts is None and not args.prompts and not (base.get("data") or {}).get("prompts") \
            and not any(o.startswith("data.prompts=") for o in overrides) and not args.allow_default_prompts:
        raise ConfigError(f"{args.osum_config}: OSUM's prompt file (dataset_conf.prompt_conf_path) is neither "
                          f"beside it nor at OSUM's repository root; pass --prompts conf/prompt_config.yaml, or "
                          f"--allow-default-prompts to train on osum-jax's English prompts")
    source = f"{base_path or 'the defaults'} + {args.osum_config}"
    cfg = config_from_recipe(recipe, base, overrides, source)
    logging.getLogger("osum_jax.train").info("OSUM recipe %s on %s:\n%s\n  prompts: %s", args.osum_config,
                                             base_path or "the defaults", describe(recipe),
                                             cfg.data.prompts or "osum-jax's built-in prompts")
    return cfg


def main(argv=None) -> int:
    apply_gpu_xla_defaults()
    ap = argparse.ArgumentParser(prog="osum-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None,
                    help="YAML config (configs/*.yaml); key=value overrides follow. With --osum-config: the base "
                         "its recipe applies to (default configs/osum_full.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    ap.add_argument("--osum-config", metavar="OSUM_YAML",
                    help="OSUM's training YAML (conf/config_llm_huawei_base-version.yaml): every key is mapped "
                         "(optimizer, schedule, accumulation, clipping, filters, batching, augmentation, "
                         "fire_module, LoRA) or named as not used; OSUM's prompt file is taken from beside it")
    ap.add_argument("--prompts", metavar="PROMPT_YAML", help="the prompt file (sets data.prompts)")
    ap.add_argument("--allow-default-prompts", action="store_true",
                    help="with --osum-config and no OSUM prompt file: train on osum-jax's English prompts")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("--plan", action="store_true", help="print per-device memory and exit (allocates nothing)")
    ap.add_argument("--devices", type=int, default=0, help="--plan: number of devices (default: those present)")
    ap.add_argument("--device-memory-gb", type=float, default=0.0, help="--plan: memory per device")
    ap.add_argument("--target", default="",
                    help="--plan: compile the real train step for a TPU/GPU target, e.g. tpu:v5p:2x2x4, tpu:v5e:4x4, "
                         "cuda:h100:8 (needs .[tpu-aot] / .[gpu-aot]; no accelerator needed)")
    ap.add_argument("--global-frames", type=int, default=0, metavar="N",
                    help="--plan: a recipe's frames per optimizer step (OSUM's: 24 GPUs x 4 x 3900 = 374400): "
                         "propose the per-device budget x accumulation that reproduces it on the devices (or "
                         "--target) with 20 %% of memory free, print the command; with --target, compile it")
    ap.add_argument("--bucket", default="", metavar="FxL",
                    help="--plan --target: compile the step for this (frames x target tokens) data bucket, e.g. "
                         "487x48 (default: the bucket with the most work per device)")
    ap.add_argument("--json", action="store_true", help="--plan: print the report as JSON")
    ap.add_argument("--hlo-out", default="", help="--plan --target: also write the optimized HLO to this file")
    ap.add_argument("--verbose", action="store_true", help="also show orbax's/absl's per-checkpoint INFO logs")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may follow options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # orbax logs ~60 INFO lines per checkpoint through absl
        logging.getLogger("absl").setLevel(logging.WARNING)
    from ..config import ConfigError
    from ..config_loading import load_config

    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"osum-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    plan_only = [flag for flag, given in (("--target", args.target), ("--devices", args.devices),
                                          ("--device-memory-gb", args.device_memory_gb), ("--json", args.json),
                                          ("--global-frames", args.global_frames), ("--bucket", args.bucket),
                                          ("--hlo-out", args.hlo_out)) if given]
    if plan_only and not args.plan:
        print(f"osum-train: {', '.join(plan_only)} go(es) with --plan", file=sys.stderr)
        return 2
    if args.hlo_out and not args.target:
        print("osum-train: --hlo-out goes with --plan --target (only a compiled step has an optimized HLO)",
              file=sys.stderr)
        return 2
    if args.devices < 0 or args.device_memory_gb < 0:
        print("osum-train: --devices and --device-memory-gb must be positive (0 or absent: the devices present, "
              "no fit verdict)", file=sys.stderr)
        return 2
    bucket = None
    if args.bucket:
        try:
            f, t = (int(v) for v in args.bucket.lower().split("x"))
            bucket = (f, t)
        except ValueError:
            print(f"osum-train: --bucket {args.bucket!r}: expected FRAMESxTARGET, e.g. 487x48", file=sys.stderr)
            return 2
        if not args.target:
            print("osum-train: --bucket goes with --plan --target", file=sys.stderr)
            return 2
    args.bucket_shape = bucket
    if args.global_frames < 0:
        print("osum-train: --global-frames must be positive", file=sys.stderr)
        return 2
    if args.plan:  # what the compilers and the memory model say (osum_jax.perf); nothing is trained
        from ..perf.cli import run_plan

        return run_plan(cfg, args)
    from .preflight import check

    try:
        check(cfg)  # inputs and outputs first: nothing is built or created for a run that cannot start
    except ConfigError as e:
        print(f"osum-train: {e}", file=sys.stderr)
        return 2
    if cfg.train.compilation_cache_dir:
        enable_compilation_cache(cfg.train.compilation_cache_dir)
    _init_distributed(cfg)
    from ..data.records import SampleError
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
    except (ConfigError, SampleError) as e:  # a bad line under data.strict=true names file:line
        print(f"osum-train: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        out = cfg.train.output_dir
        loss = summary.get("loss")
        print(f"osum-train: stopped at step {trainer.step}" + (f", loss {loss:.4f}" if loss is not None else "")
              + f"; checkpoints in {os.path.join(out, 'checkpoints')}, metrics in {os.path.join(out, 'metrics.jsonl')}"
              f" (export: osum-convert export-torch {out} --tokenizer {cfg.data.tokenizer} --out PKG)",
              file=sys.stderr)
        print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
