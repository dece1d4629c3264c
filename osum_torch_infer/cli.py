"""``osum-infer``: batched inference on audio files with an OSUM torch package; ``export-onnx``; ``calibrate-fp16``.

::

    osum-infer --model PKG --task "<TRANSCRIBE><GENDER>" (--wav FILE... | --data LIST) [--batch-size N]
               [--device auto|cuda|npu|cpu] [--dtype auto|fp32|fp16|bf16] [--decoding greedy|beam|osum]
               [--num-beams N] [--max-new-tokens N] [--do-sample] [--temperature T] [--top-k K] [--top-p P]
               [--repetition-penalty R] [--seed N] [--prompt TEXT] [--format jsonl|text] [--strict]
               --out results.jsonl [--overwrite]
    osum-infer export-onnx --model PKG --out DIR [--trace-frames N] [--check-frames N ...] [--opset N]
                           [--ir-version N]
    osum-infer calibrate-fp16 --model PKG --data LIST [--max-new-tokens N] [--limit N] [--out REPORT]

Exit status: 0 when every file was processed, 1 when some files could not be read (their errors are printed and,
in jsonl, written as records with an ``error`` field; the others are processed), 2 on a usage/package error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-infer", description="OSUM inference with a torch package "
                                "(subcommands: export-onnx, calibrate-fp16)")
    p.add_argument("--model", required=True, help="package directory written by osum-convert export-torch")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", nargs="+", help="audio files (any format libsndfile reads)")
    src.add_argument("--data", help="data list: jsonl (key, wav, optional task/start/end/prompt/extra.question) or "
                                    "'key path' lines; or tar shards: a shards_list.txt or one .tar "
                                    "(OSUM's shard_full_data layout)")
    p.add_argument("--task", help="task key, e.g. '<TRANSCRIBE><GENDER>' (default: each entry's task, else "
                                  "<TRANSCRIBE>)")
    p.add_argument("--prompt", help="free prompt text instead of the task's prompt from the package")
    p.add_argument("--batch-size", type=int, default=8, help="utterances (windows) decoded together (default 8)")
    p.add_argument("--device", default="auto", help="auto | cuda[:N] | npu[:N] | cpu")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32 (bfloat16 | float16 | float32 too)")
    p.add_argument("--decoding", default="greedy", choices=("greedy", "beam", "osum"),
                   help="greedy (deterministic, default), beam (beam search) or osum (OSUM's beam-sampling preset)")
    p.add_argument("--num-beams", type=int, help="beams for beam/osum decoding (default: the preset's)")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of argmax (osum: on)")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (osum: 5)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (osum: 0.9)")
    p.add_argument("--repetition-penalty", type=float, help="repetition penalty (osum: 1.05)")
    p.add_argument("--seed", type=int, help="seed torch's generator first (reproducible sampling on one device)")
    p.add_argument("--max-new-tokens", type=int, help="longest output per window (default: the package's)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longer audio is split into windows")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "text"), help="text = OSUM's key<TAB>text")
    p.add_argument("--out", required=True, help="results file (written to a temporary name, then renamed); an "
                                                 "existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--strict", action="store_true",
                   help="refuse the whole list at its first bad line, unknown task or repeated key (default: that "
                        "line gets an error record naming file:line, the others run, exit status 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-npu-fusions", action="store_true",
                   help="on Ascend, keep transformers' own RMSNorm instead of torch_npu's fused kernel")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-infer export-onnx",
                                description="export the audio tower (encoder + adapter + projection) to ONNX")
    p.add_argument("--model", required=True, help="package directory written by osum-convert export-torch")
    p.add_argument("--out", required=True, help="output directory (audio_tower.onnx, audio_tower.json)")
    p.add_argument("--trace-frames", type=int, default=400, help="frames of the example input used to trace")
    p.add_argument("--check-frames", type=int, nargs="+", default=[137, 1001],
                   help="lengths checked against torch with onnxruntime after export")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset written exactly (default 18; ATC: 17 or 18)")
    p.add_argument("--ir-version", type=int, default=8,
                   help="ONNX IR version of the file (default 8, what Ascend's ATC parser reads)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export-onnx":
        return _export(_export_parser().parse_args(argv[1:]))
    if argv and argv[0] == "calibrate-fp16":
        from .calibrate import main_calibrate

        return main_calibrate(argv[1:])
    return _infer(_infer_parser().parse_args(argv))


def _export(args) -> int:
    from .modeling import OSUMForConditionalGeneration, PackageError
    from .onnx_export import export_onnx

    try:
        # only the audio tower's tensors are read (~0.3 B parameters in fp32, not the 8 B model)
        model = OSUMForConditionalGeneration.from_pretrained(args.model, device="cpu", dtype="fp32", parts="audio")
        info = export_onnx(model, args.out, trace_frames=args.trace_frames, check_frames=args.check_frames,
                           opset=args.opset, ir_version=args.ir_version)
    except (PackageError, RuntimeError, ValueError) as e:
        print(f"osum-infer export-onnx: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def check_generation_flags(args) -> None:
    """Decoding settings transformers would refuse mid-run (a traceback) or take silently (``top_p`` 2, 0 beams):
    one ``ValueError`` naming the flag."""
    rules = (("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, "an integer >= 1"),
             ("--num-beams", args.num_beams, lambda v: v >= 1, "an integer >= 1"),
             ("--temperature", args.temperature, lambda v: v > 0, "> 0"),
             ("--top-k", args.top_k, lambda v: v >= 0, ">= 0 (0: off)"),
             ("--top-p", args.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
             ("--repetition-penalty", args.repetition_penalty, lambda v: v > 0, "> 0"))
    for flag, value, ok, what in rules:
        if value is not None and not ok(value):
            raise ValueError(f"{flag} must be {what}, got {value:g}")


def _infer(args) -> int:
    from .modeling import OSUMForConditionalGeneration, PackageError
    from .pipeline import Item, check_run_args, read_any, run, write_results

    try:
        out = Path(args.out)
        if out.is_dir():  # checked before any audio is read: results are never computed and then lost
            raise ValueError(f"--out {args.out} is a directory; give a file name, e.g. {out / 'results.jsonl'}")
        if out.parent.exists() and not out.parent.is_dir():
            raise ValueError(f"--out {args.out}: {out.parent} is not a directory")
        if out.exists() and not args.overwrite:
            raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
        if args.data:
            items = read_any(args.data, strict=args.strict)
        else:
            items = [Item(Path(w).stem, w) for w in args.wav]
        if not items:
            raise ValueError("no input files")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        check_generation_flags(args)  # before the model loads: a typo never costs a 7 B load
        model = OSUMForConditionalGeneration.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                             npu_fusions=not args.no_npu_fusions)
        print(f"osum-infer: {model.device}, {str(model.dtype).replace('torch.', '')} ({model.device_reason})",
              file=sys.stderr)
        if args.prompt is None and (args.task or args.strict):
            from .parsing import normalize_task

            for t in {normalize_task(args.task or it.task) for it in items if it.error is None}:
                model.prompt_for(t)  # unknown tasks fail here, before any audio is processed
        check_run_args(model, items, args.max_seconds, strict=args.strict)
    except (PackageError, ValueError, RuntimeError) as e:
        print(f"osum-infer: error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    generation = {"do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
                  "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    results = run(model, items, task=args.task, prompt=args.prompt, batch_size=args.batch_size,
                  decoding=args.decoding, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                  max_seconds=args.max_seconds, progress=not args.no_progress, generation=generation)
    ok, failed = write_results(results, args.out, args.format)
    print(f"osum-infer: {ok} result(s) written to {args.out}" + (f"; {failed} file(s) failed" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
