"""``osum-convert``: checkpoints between Hugging Face / official OSUM torch files and the JAX checkpoint.

    osum-convert import-hf --whisper DIR --qwen2 DIR [--osum-config OSUM_YAML] [--prompts PROMPT_YAML]
                           [--config CONFIG] [key=value ...] --out CKPT [--force]
    osum-convert import-osum CHECKPOINT.pt [--osum-config OSUM_YAML] [--llm-config QWEN2] [--prompts PROMPT_YAML]
                             [--config CONFIG] [key=value ...] --out CKPT [--force]
    osum-convert export-osum CKPT|RUN --out FILE.pt [--step N] [--dtype bf16|fp16|fp32]
                             [--layout-from CKPT] [--force]
    osum-convert export-torch CKPT --tokenizer DIR --out PKG [--dtype bf16|fp16|fp32] [--no-merge-lora] [--force]
    osum-convert average RUN (--steps A,B,C | --last N) --out CKPT [--force]
    osum-convert inspect PATH

See docs/convert.md. Exit status 0 on success, 1 on a checked error (message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from osum_torch_infer.contract import dtype_long, dtype_short


def _dtype(canon):
    """An argparse ``type`` accepting both dtype spellings (a wrong one is argparse's one-line error, exit 2)."""
    def parse(s: str) -> str:
        try:
            return canon(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--force", action="store_true", help="overwrite an existing output")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    hf = sub.add_parser("import-hf", help="HF Whisper (encoder) + HF Qwen2 -> JAX checkpoint; fresh adapter/LoRA")
    hf.add_argument("--whisper", required=True, help="local HF Whisper checkpoint directory (safetensors)")
    hf.add_argument("--qwen2", required=True, help="local HF Qwen2 checkpoint directory (safetensors, may be sharded)")
    hf.add_argument("--config", help="this project's YAML config (default: encoder/LLM from the HF config.json "
                                     "files, the rest from --osum-config or OSUM's defaults)")
    hf.add_argument("--osum-config", metavar="OSUM_YAML",
                    help="OSUM's own model YAML: adapter, LoRA and speech-token settings, checked against --config "
                         "and the overrides like the HF config.json files")
    hf.add_argument("--prompts", metavar="PROMPT_YAML",
                    help="OSUM's prompt_config.yaml, stored with the checkpoint (export-torch ships it)")
    hf.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parts")
    hf.add_argument("--out", required=True, help="output checkpoint directory")
    hf.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.lora.rank=16")
    common(hf)

    osum = sub.add_parser("import-osum", help="official OSUM infer.pt -> JAX checkpoint")
    osum.add_argument("checkpoint", help="OSUM flat state dict (.pt)")
    osum.add_argument("--osum-config", metavar="OSUM_YAML",
                      help="OSUM's own model YAML (conf/config_llm_huawei_base-version.yaml): its settings are "
                           "taken and checked against --config and the overrides")
    osum.add_argument("--llm-config", metavar="QWEN2_DIR_OR_CONFIG_JSON",
                      help="the Qwen2 config.json OSUM was built on (checked the same way)")
    osum.add_argument("--prompts", metavar="PROMPT_YAML",
                      help="OSUM's prompt_config.yaml, stored with the checkpoint (export-torch ships it); default: "
                           "the one found beside --osum-config (conf/prompt_config.yaml)")
    osum.add_argument("--allow-default-prompts", action="store_true",
                      help="without OSUM's prompt file, let the model go with osum-jax's English prompts (it was "
                           "trained on OSUM's Chinese ones)")
    osum.add_argument("--config", help="this project's YAML config (e.g. configs/osum_full.yaml); needed without "
                                       "--osum-config")
    osum.add_argument("--out", required=True, help="output checkpoint directory")
    osum.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    common(osum)

    exp = sub.add_parser("export-osum", help="JAX checkpoint or osum-train run -> OSUM flat state dict (.pt)")
    exp.add_argument("ckpt", help="JAX checkpoint directory (root or step directory), or an osum-train output "
                                  "directory")
    exp.add_argument("--out", required=True, help="output .pt file")
    exp.add_argument("--step", type=int, help="step to export (default: the newest)")
    exp.add_argument("--dtype", type=_dtype(dtype_long), metavar="bf16|fp16|fp32",
                     help="cast every tensor (default: the dtypes recorded at import; bfloat16|float16|float32 "
                          "spellings too)")
    exp.add_argument("--layout-from", metavar="CKPT",
                     help="converter checkpoint whose OSUM key layout and extras to use (default: the "
                          "checkpoint's own; for a run, the one its train.init_from started from)")
    common(exp)

    tp = sub.add_parser("export-torch", help="JAX checkpoint or osum-train run -> PyTorch package (safetensors)")
    tp.add_argument("ckpt", help="JAX checkpoint directory, or an osum-train output directory")
    tp.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory to ship")
    tp.add_argument("--out", required=True, help="output package directory")
    tp.add_argument("--prompts", help="prompt file to ship (default: the run's data.prompts, else the built-in)")
    tp.add_argument("--dtype", type=_dtype(dtype_short), default="bf16", metavar="bf16|fp16|fp32",
                    help="tensor dtype of the package (default bf16; bfloat16|float16|float32 spellings too)")
    tp.add_argument("--no-merge-lora", action="store_true", help="keep LoRA separate, in PEFT format")
    tp.add_argument("--step", type=int, help="step to export (default: the newest)")
    common(tp)

    av = sub.add_parser("average", help="mean of the weights of several steps of an osum-train run -> JAX "
                                        "checkpoint (as wenet's average_model.py)")
    av.add_argument("run", help="osum-train output directory (or its checkpoints folder, or a checkpoint root)")
    av.add_argument("--steps", metavar="A,B,C", help="the steps to average, separated by commas")
    av.add_argument("--last", metavar="N", help="average the newest N steps")
    av.add_argument("--out", required=True, help="output checkpoint directory (a converter checkpoint, as "
                                                 "import-* writes)")
    common(av)

    ins = sub.add_parser("inspect", help="what a JAX checkpoint, .pt or safetensors file/directory holds")
    ins.add_argument("path", help="an osum-train run, a JAX checkpoint, a .pt, or a safetensors file/directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first option: key=value overrides may sit anywhere
    bad = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion never needs an accelerator
    from ..config import ConfigError
    from . import commands
    from ..checkpoint import CheckpointError, CheckpointMismatch
    from .sources import SourceError

    t0 = time.perf_counter()
    try:
        if args.command == "inspect":
            print(commands.inspect(args.path))
            return 0
        show = not args.no_progress
        if args.command == "import-hf":
            info = commands.import_hf(args.whisper, args.qwen2, args.config, args.overrides, out=args.out,
                                      force=args.force, seed=args.seed, progress=show,
                                      osum_config=args.osum_config, prompts=args.prompts)
        elif args.command == "import-osum":
            if args.prompts is None:
                from ..osum_recipe import find_prompts

                found = find_prompts(Path(args.osum_config), "conf/prompt_config.yaml") if args.osum_config else None
                if found is not None:
                    args.prompts = str(found)
                    print(f"osum-convert import-osum: prompts from {found}", file=sys.stderr)
                elif not args.allow_default_prompts:
                    print("osum-convert import-osum: no OSUM prompt file (--prompts conf/prompt_config.yaml, or "
                          "--osum-config with it beside); the model was trained on OSUM's prompts, so pass one, or "
                          "--allow-default-prompts to ship osum-jax's English prompts", file=sys.stderr)
                    return 2
            info = commands.import_osum(args.checkpoint, args.config, args.overrides, out=args.out,
                                        force=args.force, progress=show, osum_config=args.osum_config,
                                        llm_config=args.llm_config, prompts=args.prompts)
        elif args.command == "average":
            from .average import average

            info = average(args.run, out=args.out, steps=args.steps, last=args.last, force=args.force,
                           progress=show)
            print(f"osum-convert average: steps {info['steps']} of {info['root']}; key layout from {info['layout']}",
                  file=sys.stderr)
        elif args.command == "export-torch":
            from .export_torch import export_torch
            from osum_torch_infer.package import PackageError

            try:
                res = export_torch(args.ckpt, out=args.out, tokenizer=args.tokenizer, prompts=args.prompts,
                                   dtype=args.dtype, merge_lora=not args.no_merge_lora, step=args.step,
                                   force=args.force, progress=show)
            except PackageError as e:
                print(f"osum-convert export-torch: error: {e}", file=sys.stderr)
                return 2
            print(f"osum-convert export-torch: wrote {args.out} in {time.perf_counter() - t0:.1f} s: {res}",
                  file=sys.stderr)
            return 0
        else:
            info = commands.export_osum(args.ckpt, out=args.out, step=args.step, force=args.force,
                                        dtype=args.dtype, progress=show, layout_from=args.layout_from)
            print(f"osum-convert export-osum: key layout from {info['layout']}", file=sys.stderr)
    except (ConfigError, CheckpointError, CheckpointMismatch, SourceError, FileExistsError, FileNotFoundError,
            OverflowError) as e:
        print(f"osum-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"osum-convert {args.command}: wrote {args.out}: {info['tensors']} tensors, "
          f"{info['bytes'] / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
