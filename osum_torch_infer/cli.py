"""``osum-infer``: batched inference on audio files with an OSUM torch package; ``merge``; ``export-onnx``;
``calibrate-fp16``.

::

    osum-infer --model PKG --task "<TRANSCRIBE><GENDER>" (--wav FILE... | --data LIST) [--batch-size N]
               [--device auto|cuda|npu|cpu] [--dtype auto|fp32|fp16|bf16] [--keep-fp32 auto|REPORT|NAMES]
               [--decoding greedy|beam|osum]
               [--num-beams N] [--max-new-tokens N] [--do-sample] [--temperature T] [--top-k K] [--top-p P]
               [--repetition-penalty R] [--no-repeat-ngram-size N] [--loop-repeats K] [--loop-max-ngram N]
               [--seed N] [--prompt TEXT] [--format jsonl|text] [--strict]
               [--max-seconds S] [--segment vad|fixed] [--overlap-seconds S] [--subtitles srt|vtt [--subtitles-dir D]]
               --out results.jsonl [--overwrite | --resume] [--shard I/N] [--ray [--ray-address A] [--ray-actors N]]
    osum-infer merge OUT SHARD... (--data LIST | --wav FILE...) [--format jsonl|text] [--overwrite]
    osum-infer subtitles RESULTS.jsonl --out-dir DIR [--format srt|vtt] [--overwrite]
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


KEEP_FP32_HELP = ("LLM layers run in float32 when --dtype is fp16/bf16: 'auto' (those the package's "
                  "fp16_calibration.json does not call safe), a report's path (REPORT.json), or layer numbers / "
                  "module names, comma-separated (e.g. 1,2 or llm.model.layers.1.mlp)")


def _infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-infer", description="OSUM inference with a torch package "
                                "(subcommands: merge, subtitles, export-onnx, calibrate-fp16)")
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
    p.add_argument("--keep-fp32", metavar="auto|REPORT.json|NAMES", help=KEEP_FP32_HELP)
    p.add_argument("--decoding", default="greedy", choices=("greedy", "beam", "osum"),
                   help="greedy (deterministic, default), beam (beam search) or osum (OSUM's beam-sampling preset)")
    p.add_argument("--num-beams", type=int, help="beams for beam/osum decoding (default: the preset's)")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of argmax (osum: on)")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (osum: 5)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (osum: 0.9)")
    p.add_argument("--repetition-penalty", type=float, help="repetition penalty (osum: 1.05)")
    p.add_argument("--no-repeat-ngram-size", type=int,
                   help="forbid any n-gram of this size to appear twice in a window's output (transformers' "
                        "no_repeat_ngram_size)")
    p.add_argument("--loop-repeats", type=int, default=0,
                   help="loop guard: a window whose output ends in one n-gram repeated this many times in a row "
                        "stops there, keeping one copy (0: off, the default; else >= 2)")
    p.add_argument("--loop-max-ngram", type=int, default=8,
                   help="longest n-gram (tokens) the loop guard looks for (default 8)")
    p.add_argument("--seed", type=int, help="seed torch's generator first (reproducible sampling on one device)")
    p.add_argument("--max-new-tokens", type=int, help="longest output per window (default: the package's)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longer audio is split into segments of at "
                                                                     "most this long (default 30)")
    p.add_argument("--segment", default="vad", choices=("vad", "fixed"),
                   help="how audio over --max-seconds is split: vad (default: cut at pauses found by Silero VAD, "
                        "with --overlap-seconds where it must cut mid-speech, words de-duplicated when joined) or "
                        "fixed (equal windows, no overlap)")
    p.add_argument("--overlap-seconds", type=float, default=1.0,
                   help="audio kept in both segments where --segment vad cuts mid-speech (default 1.0)")
    p.add_argument("--subtitles", choices=("srt", "vtt"),
                   help="also write one subtitle file per utterance (a cue per segment) from the results, when the "
                        "run ends (jsonl only)")
    p.add_argument("--subtitles-dir", help="folder for --subtitles (default: OUT's name without suffix + _srt / _vtt)")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "text"), help="text = OSUM's key<TAB>text")
    p.add_argument("--out", required=True, help="results file, one line appended per finished utterance; an "
                                                 "existing file is refused unless --overwrite or --resume")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="start --out afresh if it exists")
    again.add_argument("--resume", action="store_true",
                       help="keep the results already in --out and decode only the keys it lacks (a torn last line "
                            "from a killed run is dropped and decoded again)")
    p.add_argument("--shard", metavar="I/N", help="decode only shard I of N (0 <= I < N): every N-th utterance of "
                                                  "the list, starting at the I-th; join with osum-infer merge")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Data job: map_batches over a pool of actors, one per device")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--ray-actors", type=int, help="actors (default: the cluster's GPUs / NPUs; on cpu, its nodes)")
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


def _subtitles_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-infer subtitles",
                                description="one SRT or WebVTT file per utterance (a cue per segment) from an "
                                            "osum-infer jsonl results file")
    p.add_argument("results", help="osum-infer results (jsonl)")
    p.add_argument("--out-dir", required=True, help="folder to write KEY.srt / KEY.vtt into (replaced as a whole)")
    p.add_argument("--format", default="srt", choices=("srt", "vtt"), help="srt (default) or vtt")
    p.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    return p


def write_subtitles(results: str | Path, out_dir: str | Path, fmt: str = "srt") -> tuple[int, int]:
    """Write ``out_dir/KEY.<fmt>`` (the key percent-encoded into a file name) for every result of a jsonl results
    file with ``segments``; returns ``(written, skipped)`` (error records, results without segments). The folder
    is filled under a temporary name and renamed into place. ``ValueError`` naming ``file:line`` for a line that is
    not a JSON object."""
    from urllib.parse import quote

    from .files import atomic_file, json_object_line, LineError
    from .segment import to_srt, to_vtt

    results = Path(results)
    try:
        raw = results.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the results file {results}: {e}") from None
    files, skipped = {}, 0
    for n, line in enumerate(raw, 1):  # all checked before anything is written
        if not line.strip():
            continue
        try:
            r = json_object_line(line)
        except LineError as e:
            raise ValueError(f"{results}:{n}: {e.detail} (subtitles are made from jsonl results)") from None
        if "error" in r or not isinstance(r.get("segments"), list) or "key" not in r:
            skipped += 1
            continue
        files[f"{quote(str(r['key']), safe='')}.{fmt}"] = to_srt(r["segments"]) if fmt == "srt" \
            else to_vtt(r["segments"])
    with atomic_file(out_dir) as tmp:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    written = len(files)
    return written, skipped


def _subtitles(args) -> int:
    try:
        out = Path(args.out_dir)
        if out.exists() and not args.overwrite:
            raise ValueError(f"--out-dir {out} exists; pass --overwrite to replace it")
        written, skipped = write_subtitles(args.results, out, args.format)
    except (ValueError, OSError) as e:
        print(f"osum-infer subtitles: error: {e}", file=sys.stderr)
        return 2
    print(f"osum-infer subtitles: {written} file(s) written to {out}"
          + (f"; {skipped} result(s) without segments (errors) skipped" if skipped else ""), file=sys.stderr)
    return 0


def _write_run_subtitles(args) -> bool:
    """``--subtitles``: the run's whole results file (resumed lines too) as subtitle files; True on an error (said
    on stderr)."""
    try:
        folder = subtitles_dir(args)
        n, _ = write_subtitles(args.out, folder, args.subtitles)
    except (ValueError, OSError) as e:
        print(f"osum-infer: error: subtitles: {e}", file=sys.stderr)
        return True
    print(f"osum-infer: {n} subtitle file(s) written to {folder}", file=sys.stderr)
    return False


def subtitles_dir(args) -> Path:
    """``--subtitles-dir``, else OUT's name without its suffix + ``_srt`` / ``_vtt`` beside it."""
    out = Path(args.out)
    return Path(args.subtitles_dir) if args.subtitles_dir else out.with_name(f"{out.stem}_{args.subtitles}")


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-infer merge",
                                description="join the jsonl results of the shards of one list in the list's order, "
                                            "checking that every key is there exactly once")
    p.add_argument("out", help="merged results file (written to a temporary name, then renamed)")
    p.add_argument("shards", nargs="+", help="results files of osum-infer --shard I/N runs (any order)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="the data list the shards were decoded from (gives the order)")
    src.add_argument("--wav", nargs="+", help="the audio files the shards were decoded from (gives the order)")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "text"), help="of the merged file")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return _merge(_merge_parser().parse_args(argv[1:]))
    if argv and argv[0] == "subtitles":
        return _subtitles(_subtitles_parser().parse_args(argv[1:]))
    if argv and argv[0] == "export-onnx":
        return _export(_export_parser().parse_args(argv[1:]))
    if argv and argv[0] == "calibrate-fp16":
        from .calibrate import main_calibrate

        return main_calibrate(argv[1:])
    return _infer(_infer_parser().parse_args(argv))


def _export(args) -> int:
    from .loading import load_model
    from .modeling import PackageError
    from .onnx_export import export_onnx

    try:
        # only the audio tower's tensors are read (~0.3 B parameters in fp32, not the 8 B model)
        model = load_model(args.model, device="cpu", dtype="fp32", parts="audio")
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
             ("--repetition-penalty", args.repetition_penalty, lambda v: v > 0, "> 0"),
             ("--no-repeat-ngram-size", getattr(args, "no_repeat_ngram_size", None), lambda v: v >= 1,
              "an integer >= 1"),
             ("--loop-repeats", getattr(args, "loop_repeats", None), lambda v: v == 0 or v >= 2, "0 (off) or >= 2"),
             ("--loop-max-ngram", getattr(args, "loop_max_ngram", None), lambda v: v >= 1, "an integer >= 1"))
    for flag, value, ok, what in rules:
        if value is not None and not ok(value):
            raise ValueError(f"{flag} must be {what}, got {value:g}")


def check_segment_flags(args) -> None:
    """``ValueError`` naming the flag for segmenting settings that cannot work, and ``RuntimeError`` when
    ``--segment vad`` cannot load its VAD; both before any model or audio is loaded."""
    if args.max_seconds > 0 and not 0 <= args.overlap_seconds < args.max_seconds / 2:  # <= 0: refused below
        raise ValueError(f"--overlap-seconds must be >= 0 and below half of --max-seconds ({args.max_seconds:g}), "
                         f"got {args.overlap_seconds:g}")
    if args.subtitles and args.format != "jsonl":
        raise ValueError("--subtitles needs --format jsonl (the subtitles are made from its segments)")
    if args.segment == "vad":
        from .segment import check_vad

        check_vad()


def _check_out(out: Path, *, overwrite: bool, resume: bool = False) -> None:
    """Refuse an ``--out`` that cannot be (or must not be) written, before any audio is read: results are never
    computed and then lost."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {out / 'results.jsonl'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is not a directory")
    if out.exists() and not (overwrite or resume):
        raise ValueError(f"--out {out} exists; pass --resume to finish it or --overwrite to replace it")


def _read_items(args, strict: bool):
    from .pipeline import Item, mark_repeated_keys, read_any

    if args.data:
        items = read_any(args.data, strict=strict)
    else:
        items = [Item(Path(w).stem, w) for w in args.wav]
    if not items:
        raise ValueError("no input files")
    mark_repeated_keys(items, strict=strict)  # over the whole list: every shard sees the same keys
    return items


def _infer(args) -> int:
    from .bulk import Journal, parse_shard, resume_plan, take_shard

    try:
        out = Path(args.out)
        _check_out(out, overwrite=args.overwrite, resume=args.resume)
        shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if args.ray_actors is not None and args.ray_actors < 1:
            raise ValueError("--ray-actors must be >= 1")
        check_generation_flags(args)  # before the model loads: a typo never costs a 7 B load
        check_segment_flags(args)
        items = take_shard(_read_items(args, args.strict), *shard)
        source = (args.data or "the --wav files") + (f", shard {args.shard}" if args.shard else "")
        todo, prior = items, None
        if args.resume and out.exists():
            todo, prior = resume_plan(out, items, args.format, source)
            if prior.torn is not None:
                print(f"osum-infer: {out}:{prior.torn[0]}: a torn last line ({prior.torn[1]} bytes, cut off when "
                      f"the run was stopped) is dropped; its utterance is decoded again", file=sys.stderr)
            print(f"osum-infer: resuming {out}: {len(prior.lines)} of {len(items)} utterance(s) done, {len(todo)} "
                  f"to go", file=sys.stderr)
        model = _checked_model(args, todo) if todo else None
    except (ValueError, RuntimeError) as e:  # PackageError is a ValueError
        print(f"osum-infer: error: {e}", file=sys.stderr)
        return 2
    done, done_failed = (len(prior.lines), prior.errors) if prior is not None else (0, 0)
    if not todo:
        print(f"osum-infer: nothing to do: all {len(items)} result(s) are in {out}"
              + (f"; {done_failed} file(s) failed" if done_failed else ""), file=sys.stderr)
        if args.subtitles and _write_run_subtitles(args):
            return 2
        return 1 if done_failed else 0
    if args.seed is not None and not args.ray:
        import torch

        torch.manual_seed(args.seed)
    options = dict(task=args.task, prompt=args.prompt, batch_size=args.batch_size, decoding=args.decoding,
                   max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, max_seconds=args.max_seconds,
                   segment=args.segment, overlap_seconds=args.overlap_seconds,
                   loop_repeats=args.loop_repeats, loop_max_ngram=args.loop_max_ngram,
                   generation={"do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
                               "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
                               "no_repeat_ngram_size": args.no_repeat_ngram_size})
    try:
        journal = Journal(out, keep=prior.size if prior is not None else 0)
    except (ValueError, OSError) as e:
        print(f"osum-infer: error: {e}", file=sys.stderr)
        return 2
    with journal:
        if args.ray:
            from .ray_infer import run_ray

            try:
                ok, failed = run_ray(todo, journal.write, model=args.model, device=args.device, dtype=args.dtype,
                                     npu_fusions=not args.no_npu_fusions, fmt=args.format, seed=args.seed,
                                     options=options, batch_size=args.batch_size, actors=args.ray_actors,
                                     address=args.ray_address, progress=not args.no_progress,
                                     keep_fp32=args.keep_fp32)
            except ValueError as e:
                print(f"osum-infer: error: {e}", file=sys.stderr)
                return 2
        else:
            from .bulk import record_line
            from .pipeline import run

            ok = failed = 0
            for r in run(model, todo, progress=not args.no_progress, **options):
                line = record_line(r, args.format)
                if line is not None:
                    journal.write(line)
                error = "error" in r
                ok, failed = ok + (not error), failed + error
    failed_all = failed + done_failed
    print(f"osum-infer: {ok} result(s) written to {args.out}" + (f" ({done} already there)" if done else "")
          + (f"; {failed_all} file(s) failed" if failed_all else ""), file=sys.stderr)
    if args.subtitles and _write_run_subtitles(args):
        return 2
    return 1 if failed_all else 0


def _checked_model(args, items):
    """The loaded model (``None`` with ``--ray``: the actors load it), after the checks that need the package:
    the tasks' prompts and the window length. ``ValueError`` / ``PackageError`` on a problem."""
    from .parsing import normalize_task
    from .pipeline import check_max_seconds

    tasks = {normalize_task(args.task or it.task) for it in items if it.error is None}
    if args.ray:  # the driver reads the package's config and prompts only, never its weights
        from .package import PackageConfig, read_prompts

        root = Path(args.model)
        if not root.is_dir():
            raise ValueError(f"{root} is not a package directory")
        pkg = PackageConfig.from_json(root / "config.json")
        check_max_seconds(args.max_seconds, 2 * pkg.encoder.max_source_positions)
        if args.keep_fp32:  # the names / the report checked here, not in every actor (this imports torch)
            from .loading import keep_fp32_modules

            keep_fp32_modules(args.keep_fp32, root, int(pkg.text_config.get("num_hidden_layers", 0)))
            if args.keep_fp32.strip().endswith(".json"):
                args.keep_fp32 = str(Path(args.keep_fp32.strip()).resolve())
        if args.prompt is None and (args.task or args.strict):
            prompts = read_prompts(root, pkg.prompts_file)
            for t in tasks:
                if t not in prompts:
                    raise ValueError(f"task {t!r} is not in the package's prompt file ({pkg.prompts_file}); known "
                                     f"tasks: {sorted(prompts)}; or pass a prompt text")
        return None
    from .loading import load_model
    from .pipeline import check_run_args

    model = load_model(args.model, device=args.device, dtype=args.dtype, npu_fusions=not args.no_npu_fusions,
                       keep_fp32=args.keep_fp32)
    print(f"osum-infer: {model.device}, {str(model.dtype).replace('torch.', '')} ({model.device_reason})",
          file=sys.stderr)
    if args.prompt is None and (args.task or args.strict):
        for t in tasks:
            model.prompt_for(t)  # unknown tasks fail here, before any audio is processed
    check_run_args(model, items, args.max_seconds, strict=args.strict)
    return model


def _merge(args) -> int:
    from .bulk import MergeError, merge

    try:
        out = Path(args.out)
        _check_out(out, overwrite=args.overwrite)
        if out.resolve() in {Path(s).resolve() for s in args.shards}:
            raise ValueError(f"{out} is one of the shards; merge into a new file")
        items = _read_items(args, strict=False)
        ok, failed = merge(out, args.shards, items, source=args.data or "the --wav files", fmt=args.format)
    except MergeError as e:
        for problem in e.problems[:20]:
            print(f"osum-infer merge: error: {problem}", file=sys.stderr)
        more = len(e.problems) - 20
        print(f"osum-infer merge: {len(e.problems)} problem(s)" + (f" ({more} more not shown)" if more > 0 else "")
              + f"; nothing written to {args.out}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"osum-infer merge: error: {e}", file=sys.stderr)
        return 2
    print(f"osum-infer merge: {ok + failed} result(s) from {len(args.shards)} file(s) written to {args.out}"
          + (f"; {failed} file(s) failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
