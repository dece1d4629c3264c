"""``osum-eval``: score hypotheses against references, one report per task (no torch needed).

::

    osum-eval --ref REF --hyp HYP [--task TASK] [--out DIR] [--ignore FILE] [--cluster FILE] [--case-sensitive]
              [--v 1]

REF / HYP: OSUM's ``key<TAB>text`` files, or jsonl (``osum-infer`` results.jsonl: ``key``, ``text``, ``task``;
a data.list: ``key``, ``txt``, ``task``). The task of an utterance is ``--task`` if given, else the hypothesis'
``task``, else the reference's, else ``<TRANSCRIBE>``. Writes ``DIR/report.json`` and, per task,
``DIR/<task>.md`` and ``DIR/<task>.<field>.confusion.png``; prints the markdown reports.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from .parsing import TAG_TASKS, expected_tags, is_align, is_transcribe
from .scoring import WerOptions, format_report, plot_confusion, read_text_file, score
from .files import LineError
from .formats.lists import lines, sniff


def read_any(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """``{key: text}`` and ``{key: task}`` from a text or jsonl file; errors name the file and line."""
    path = Path(path)
    if sniff(path) != "jsonl":  # ValueError naming the file when it cannot be read
        return read_text_file(path), {}
    texts, tasks = {}, {}
    for line in lines(path):  # the one data-list reader (osum_torch_infer.formats.lists)
        if line.blank:
            continue
        n = line.number
        try:
            d = line.json()
            key = str(d["key"])
        except (LineError, KeyError) as e:
            raise ValueError(f"{path}:{n}: bad line ({type(e).__name__}: {e})") from None
        if "error" in d:
            continue  # an unreadable file in osum-infer results: it counts as missing
        text = d.get("text", d.get("txt"))
        if text is None:
            raise ValueError(f"{path}:{n}: no 'text' or 'txt' field")
        texts[key] = str(text)
        if d.get("task"):
            tasks[key] = str(d["task"])
    return texts, tasks


def _slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", task).strip("_").lower() or "task"


def _scored(task: str) -> bool:
    """Whether osum-eval has a metric for ``task`` (WER/CER, tag accuracy or timestamp error)."""
    return is_transcribe(task) or is_align(task) or bool(expected_tags(task))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osum-eval", description="WER/CER, tag accuracy and SRWT timestamp error")
    p.add_argument("--ref", required=True, help="references: a data.list (txt, task) or OSUM's key<TAB>text file")
    p.add_argument("--hyp", required=True, help="hypotheses: osum-infer's results.jsonl or a key<TAB>text file")
    p.add_argument("--task", help="score every utterance as this task")
    p.add_argument("--out", help="directory for report.json, markdown reports, confusion PNGs and alignment.txt")
    p.add_argument("--ignore", metavar="FILE", help="words not scored (compute-wer's --ig file: white-space separated)")
    p.add_argument("--cluster", metavar="FILE",
                   help="words scored as equal (compute-wer's --cluster file: one class per line)")
    p.add_argument("--case-sensitive", action="store_true", help="keep case (default: upper-cased, as compute-wer)")
    p.add_argument("--v", type=int, default=0, choices=(0, 1),
                   help="1: print each utterance's alignment, as compute-wer --v=1 (always written to "
                        "OUT/alignment.txt)")
    args = p.parse_args(argv)
    if args.task and not _scored(args.task):
        print(f"osum-eval: error: --task {args.task!r} has no metric (tasks with <TRANSCRIBE>, <ALIGN> or a tag "
              f"task {sorted(TAG_TASKS)} are scored)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out and out.exists() and not out.is_dir():
        print(f"osum-eval: error: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        refs, ref_tasks = read_any(args.ref)
        hyps, hyp_tasks = read_any(args.hyp)
        options = WerOptions.from_files(args.ignore, args.cluster, args.case_sensitive)
    except ValueError as e:
        print(f"osum-eval: error: {e}", file=sys.stderr)
        return 2
    tasks = dict(ref_tasks)
    tasks.update(hyp_tasks)
    result = score(refs, hyps, tasks, args.task, options)
    listing = "\n".join(block for r in result["tasks"].values() for block in r.pop("alignment", []))
    if not result["tasks"]:
        print(f"osum-eval: error: no key is in both {args.ref} and {args.hyp}", file=sys.stderr)
        return 2
    if out:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"osum-eval: error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
    unscored = sorted(t for t in result["tasks"] if not _scored(t))
    if unscored:
        print(f"osum-eval: no metric for task(s) {unscored} (their utterances are counted, not scored)",
              file=sys.stderr)
    for task, report in result["tasks"].items():
        text = format_report(report)
        print(text)
        if out:
            slug = _slug(task)
            for field, tag_report in report.get("tags", {}).items():
                png = out / f"{slug}.{field}.confusion.png"
                plot_confusion(tag_report, png, title=f"{task} {field}: accuracy {tag_report['accuracy']:.3f}")
                tag_report["plot"] = png.name
            (out / f"{slug}.md").write_text(text, encoding="utf-8")
    for name, what in (("missing_hyp", "without a hypothesis"), ("missing_ref", "without a reference")):
        if result[name]:
            print(f"osum-eval: {len(result[name])} key(s) {what} (not scored): {result[name][:10]}",
                  file=sys.stderr)
    if args.v:
        print(listing)
    if out:
        (out / "alignment.txt").write_text(listing, encoding="utf-8")
        (out / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
