"""``osum-decode``: decode a test set with a JAX checkpoint (or an ``osum-train`` run) on the training mesh.

::

    osum-decode CKPT_OR_RUN --data LIST|SHARDS --out results.jsonl [--task T] [--prompt TEXT] [--step N]
                [--decoding greedy|beam] [--num-beams N] [--length-penalty A] [--max-new-tokens N]
                [--batch-size N] [--frame-buckets 500,1000,...] [--max-seconds S] [--format jsonl|text]
                [--overwrite | --resume] [--shard I/N] [--strict] [--no-progress] [key=value ...]
    osum-decode CONFIG.yaml|CKPT_OR_RUN --plan --target tpu:v5p:2x2x4 [--json] [key=value ...]

It reads what ``osum-infer`` reads (data lists: jsonl or ``key path``; tar shards: a ``shards_list.txt`` or one
``.tar``), cuts audio over ``--max-seconds`` into windows as ``osum-infer`` does, and writes the same result
lines (``osum_torch_infer.pipeline.run`` drives both; this command only supplies the decoder), so ``osum-eval``
scores them. Results are appended and flushed per utterance; ``--resume`` and ``--shard I/N`` are
``osum-infer``'s (``osum-infer merge`` joins the shards). ``key=value`` overrides the checkpoint's config, e.g.
``train.mesh.data=4 train.mesh.fsdp=2`` (the mesh: rows shard over data x fsdp, the model as training shards
it) or ``data.tokenizer=DIR``. The tokenizer is the config's ``data.tokenizer``; the prompts are those stored
with the checkpoint, else ``data.prompts``, else the shipped defaults (the first prompt of a task, as
``osum-infer``).

Several processes (hosts): set ``train.distributed.coordinator_address/num_processes/process_id`` or
``OSUM_COORDINATOR``/``OSUM_NUM_PROCESSES``/``OSUM_PROCESS_ID`` as for ``osum-train`` (a SLURM, Open MPI or
multi-host TPU job needs none of them), and start the same command on every process. Process ``K`` of ``N``
decodes every N-th utterance from the K-th (after ``--shard``), its rows in one global batch with the others'
on the whole mesh, and writes jsonl results to ``OUT.partK-of-N``; when all have finished, process 0 merges the
parts into ``OUT`` in list order (``osum-infer merge``). ``--resume`` resumes each part; the parts are kept.

Exit status: 0 when every file was decoded, 1 when some could not be read (error records), 2 on a usage,
config or checkpoint error (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

PROG = "osum-decode"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="decode a test set with a JAX OSUM checkpoint on the "
                                                       "training mesh; writes osum-infer's result lines")
    p.add_argument("checkpoint", help="JAX checkpoint (osum-convert import-*), an osum-train output directory, or "
                                      "(--plan only) a config YAML")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.mesh.data=8")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--data", help="data list (jsonl or 'key path' lines) or tar shards (shards_list.txt / .tar)")
    p.add_argument("--out", help="results file, one line appended per finished utterance")
    p.add_argument("--task", help="task key, e.g. '<TRANSCRIBE>' (default: each entry's task, else <TRANSCRIBE>)")
    p.add_argument("--prompt", help="free prompt text instead of the task's prompt")
    p.add_argument("--decoding", default="greedy", choices=("greedy", "beam"), help="greedy (default) or beam")
    p.add_argument("--num-beams", type=int, default=4, help="beams for --decoding beam (default 4)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-probability / length ** this (default 1.0, transformers')")
    p.add_argument("--max-new-tokens", type=int, default=400, help="longest output per window (default 400)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per device per batch (default 8)")
    p.add_argument("--frame-buckets", default="500,1000,1500,2000,3000",
                   help="static frame lengths a batch is padded to (default 500,1000,1500,2000,3000)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longer audio is split into windows")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "text"), help="text = OSUM's key<TAB>text")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="start --out afresh if it exists")
    again.add_argument("--resume", action="store_true", help="keep the results in --out, decode only missing keys")
    p.add_argument("--shard", metavar="I/N", help="decode only shard I of N (every N-th utterance from the I-th)")
    p.add_argument("--strict", action="store_true", help="refuse the list at its first bad line or repeated key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--plan", action="store_true", help="compile the decode program for --target and report")
    p.add_argument("--target", default="", help="--plan: e.g. tpu:v5p:2x2x4")
    p.add_argument("--plan-frames", type=int, default=3000, help="--plan: frames per utterance (default 3000)")
    p.add_argument("--plan-prompt", type=int, default=64, help="--plan: prompt tokens (default 64)")
    p.add_argument("--json", action="store_true", help="--plan: print the report as JSON")
    return p


class JaxDecoder:
    """What ``osum_torch_infer.pipeline.run`` needs of a model, over a :class:`DecodeProgram`: the mel bins and
    window limit, the prompt book, the tokenizer, and ``generate`` (token lists)."""

    def __init__(self, program, state, tokenizer, prompts):
        self.program, self.state, self.tok, self.prompts = program, state, tokenizer, prompts
        enc = program.cfg.model.encoder
        self.config = SimpleNamespace(encoder=SimpleNamespace(num_mel_bins=enc.num_mel_bins))
        self.encoder = SimpleNamespace(max_frames=2 * enc.max_source_positions)

    def prompt_for(self, task: str) -> str:
        from osum_torch_infer.contract import normalize_task

        from ..data.text import NO_PROMPT

        key = normalize_task(task)
        if key not in self.prompts.prompts:
            raise ValueError(f"task {key!r} is not in the prompt file {self.prompts.source}; known tasks: "
                             f"{self.prompts.tasks}; or pass --prompt")
        p = self.prompts.prompts[key][0]
        return "" if p == NO_PROMPT else p

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text) if text else []

    def decode_text(self, ids) -> str:
        return self.tok.decode(ids)

    def generate(self, feats, lengths, prompts, **_settings) -> list[list[int]]:
        """``feats [B, T, mel]`` (``B`` <= the program's rows), ``lengths [B]``, prompt ids -> token lists."""
        return self.program.decode(self.state, [feats[i, :int(n)] for i, n in enumerate(lengths)], prompts)


def _buckets(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise ValueError(f"--frame-buckets {text!r}: expected positive integers separated by commas")
    return out


def _prompt_book(ckpt: str, step, cfg):
    from ..checkpoint import read_prompts
    from ..data.text import PromptBook

    stored = read_prompts(ckpt, step) if not cfg.data.prompts else None
    if stored:
        return PromptBook(stored["prompts"], source=f"{ckpt} (stored prompts)")
    return PromptBook.load(cfg.data.prompts or None)


def _tokenizer(cfg):
    from ..data.text import Tokenizer

    if not cfg.data.tokenizer:
        raise ValueError("the checkpoint's config has no data.tokenizer; pass data.tokenizer=DIR (a local "
                         "Hugging Face tokenizer directory)")
    try:
        return Tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    except FileNotFoundError as e:
        raise ValueError(f"data.tokenizer: {e}") from None


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ValueError(f"{bad[0]!r}: overrides are key=value (the one positional argument is the checkpoint)")
    if args.plan:
        if not args.target:
            raise ValueError("--plan needs --target, e.g. --target tpu:v5p:2x2x4")
        return
    for flag, given in (("--target", args.target), ("--json", args.json)):
        if given:
            raise ValueError(f"{flag} goes with --plan")
    if not args.data or not args.out:
        raise ValueError("--data and --out are required (or --plan --target)")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {out / 'results.jsonl'}")
    if out.exists() and not (args.overwrite or args.resume):
        raise ValueError(f"--out {out} exists; pass --resume to finish it or --overwrite to replace it")


def _decoding(args):
    from .program import Decoding

    return Decoding(args.decoding, args.max_new_tokens, args.num_beams, args.length_penalty)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    try:
        _check_args(args)
        _decoding(args).check()
        buckets = _buckets(args.frame_buckets)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        return _plan(args, buckets)
    return _decode(args, buckets)


def _part(out: Path, k: int, n: int) -> Path:
    """Process ``k`` of ``n``'s results file beside ``out``."""
    return out.with_name(f"{out.name}.part{k}-of-{n}")


def _decode(args, buckets) -> int:
    from osum_torch_infer.bulk import (Journal, MergeError, merge, parse_shard, record_line, resume_plan,
                                       take_shard)
    from osum_torch_infer.pipeline import check_max_seconds, mark_repeated_keys, read_any, run

    from ..checkpoint import abstract_model, load_flat, load_model, read_config, restore_params
    from ..config import ConfigError
    from ..train.cli import _init_distributed
    from ..train.mesh import build_mesh
    from .program import DecodeProgram

    out = Path(args.out)
    try:
        _init_distributed(read_config(args.checkpoint, args.step, args.overrides))
        import jax

        k, n = jax.process_index(), jax.process_count()
        fmt, mine = (args.format, out) if n == 1 else ("jsonl", _part(out, k, n))  # merge needs jsonl parts
        if n > 1 and mine.exists() and not (args.overwrite or args.resume):
            raise ValueError(f"--out part {mine} exists; pass --resume to finish it or --overwrite to replace it")
        shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
        items = read_any(args.data, strict=args.strict)
        if not items:
            raise ValueError(f"{args.data}: no utterances")
        mark_repeated_keys(items, strict=args.strict)
        items = take_shard(items, *shard)
        listed = items
        items = take_shard(items, k, n) if n > 1 else items
        source = args.data + (f", shard {args.shard}" if args.shard else "")
        todo, prior = items, None
        if args.resume and mine.exists():
            todo, prior = resume_plan(mine, items, fmt, source + (f", process {k} of {n}" if n > 1 else ""))
            if prior.torn is not None:
                print(f"{PROG}: {mine}:{prior.torn[0]}: a torn last line is dropped; its utterance is decoded again",
                      file=sys.stderr)
            print(f"{PROG}: resuming {mine}: {len(prior.lines)} of {len(items)} utterance(s) done, {len(todo)} to go",
                  file=sys.stderr)
        if not todo and n == 1:
            failed = prior.errors if prior is not None else 0
            print(f"{PROG}: nothing to do: all {len(items)} result(s) are in {out}", file=sys.stderr)
            return 1 if failed else 0
        if n == 1:
            model, cfg = load_model(args.checkpoint, args.step, args.overrides)
        else:  # each process reads the weights onto one of its own devices (load_model's default is device 0's)
            cfg = read_config(args.checkpoint, args.step, args.overrides)
            model = abstract_model(cfg)
            load_flat(model, restore_params(args.checkpoint, args.step, cfg, device=jax.local_devices()[0]),
                      source=str(args.checkpoint))
        check_max_seconds(args.max_seconds, 2 * cfg.model.encoder.max_source_positions)
        tok = _tokenizer(cfg)
        prompts = _prompt_book(args.checkpoint, args.step, cfg)
        mesh = build_mesh(cfg.train.mesh)
        program = DecodeProgram(cfg, mesh, _decoding(args), tok.eod_id, batch_per_device=args.batch_size,
                                frame_buckets=buckets)
        if program.rows % n:
            raise ValueError(f"{program.rows} rows per batch do not split over {n} processes")
        decoder = JaxDecoder(program, program.place(model), tok, prompts)
        del model
        if args.prompt is None and (args.task or args.strict):
            from osum_torch_infer.contract import normalize_task

            for t in {normalize_task(args.task or it.task) for it in todo if it.error is None}:
                decoder.prompt_for(t)  # an unknown task fails here, before any audio is read
        journal = Journal(mine, keep=prior.size if prior is not None else 0)
    except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{PROG}: {kind}: {e}", file=sys.stderr)
        return 2
    who = f"process {k} of {n}: " if n > 1 else ""
    print(f"{PROG}: {who}{len(mesh.devices.flat)} device(s) {dict(mesh.shape)}, {program.rows} row(s) per batch, "
          f"{args.decoding}" + (f" ({args.num_beams} beams)" if args.decoding == "beam" else ""), file=sys.stderr)
    ok = failed = 0
    with journal:
        if todo:
            for r in run(decoder, todo, task=args.task, prompt=args.prompt, batch_size=program.local_rows,
                         decoding=args.decoding, max_seconds=args.max_seconds, progress=not args.no_progress):
                line = record_line(r, fmt)
                if line is not None:
                    journal.write(line)
                error = "error" in r
                ok, failed = ok + (not error), failed + error
        program.drain(decoder.state)  # several processes: wait (in dummy steps) for the others' batches
    done, done_failed = (len(prior.lines), prior.errors) if prior is not None else (0, 0)
    failed_all = failed + done_failed
    print(f"{PROG}: {who}{ok} result(s) written to {mine}" + (f" ({done} already there)" if done else "")
          + (f"; {failed_all} file(s) failed" if failed_all else ""), file=sys.stderr)
    if n == 1:
        return 1 if failed_all else 0
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("osum-decode: every part is written")
    if k != 0:
        return 1 if failed_all else 0
    try:
        merged, merged_failed = merge(out, [_part(out, i, n) for i in range(n)], listed, source=source, fmt=args.format)
    except (MergeError, ValueError, OSError) as e:
        print(f"{PROG}: error: merging the parts into {out}: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: merged {n} part(s) into {out}: {merged} result(s)"
          + (f"; {merged_failed} file(s) failed" if merged_failed else ""), file=sys.stderr)
    return 1 if merged_failed else 0


def _plan(args, buckets) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a topology needs no accelerator backend here
    from ..config import ConfigError
    from .plan import compile_decode_plan, format_decode_report

    try:
        report = compile_decode_plan(args.checkpoint, args.overrides, args.target, _decoding(args),
                                     batch_per_device=args.batch_size, frames=args.plan_frames,
                                     prompt=args.plan_prompt, step=args.step)
    except (ValueError, RuntimeError) as e:  # ConfigError, CheckpointError, MissingCompiler
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{PROG}: {kind}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_decode_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
