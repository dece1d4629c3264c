#!/usr/bin/env python
"""The demo over several corpus seeds, plus a 1e-6 perturbation of one: the spread, not one lucky run.

    python scripts/bench_demo.py [--seeds 5] [--first-seed 0] [--perturb 1e-6] [--perturb-seed 0]
                                 [--demo-args="--listen-until 0.05"] [--out /tmp/bench_demo] [--write-reference]
                                 [osum-train overrides ...]

For each seed, ``scripts/demo.py --seed S`` (its own corpus, training, export, inference and scoring, exactly as
``make demo`` runs them); then ``scripts/demo.py`` again on the corpus of ``--perturb-seed`` with
``data.feature_noise=PERTURB`` (right after that seed's own run): Gaussian noise of that standard deviation on
every training feature, a stand-in for another machine's float rounding. Prints each run's figures, then min /
median / max of each figure over the seeds, the perturbed run beside its unperturbed twin, and whether issue
32's acceptance holds: every run (perturbed one included) test WER <= 10 %, held-out-voices WER <= 20 %, gender
and age accuracy >= 95 %, and the perturbed run's WERs within ``--perturb-tolerance`` (5 points) of its twin's.
Exit status 1 when it does not.

``--demo-args`` passes options to every ``scripts/demo.py`` run (one shell-quoted string, checked by demo.py's
own parser before any run starts; ``--out``, ``--seed``, ``--corpus`` and ``--keep-corpus`` are the bench's own).

``--write-reference`` stores the spread in scripts/demo_reference.json (with the commit and command), which the
demo's own report compares each run against; do that from a clean committed tree only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.demo import FIGURES, REFERENCE, build_parser, check_options, figures, misses_target  # noqa: E402

BENCH_OWNS = ("--out", "--seed", "--corpus", "--keep-corpus")  # bench_demo sets these for every run


def run_demo(out: Path, seed: int, extra: list[str], log: Path) -> dict:
    cmd = [sys.executable, "scripts/demo.py", "--out", str(out), "--seed", str(seed), *extra]
    print(f"$ {shlex.join(cmd)}  (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"bench_demo: the demo for seed {seed} failed with exit code {rc} (log: {log})")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    figs = figures(summary)
    figs["wall_s"] = time.time() - t0
    figs["corpus_matches_reference"] = summary["corpus"]["matches_reference"]
    return figs


def fmt(name: str, v: float) -> str:
    return f"{v:.0f} s" if name.endswith("_s") else f"{100 * v:.1f} %"


def spread(runs: list[dict], names: list[str]) -> dict[str, list[float]]:
    return {n: [min(r[n] for r in runs), statistics.median(r[n] for r in runs), max(r[n] for r in runs)]
            for n in names if all(n in r for r in runs)}


def failures(label: str, figs: dict) -> list[str]:
    out = []
    for name, (text, _, _, higher, bound) in FIGURES.items():
        if name not in figs:
            out.append(f"{label}: {text} missing")
        elif misses_target(name, figs[name]):
            out.append(f"{label}: {text} {fmt(name, figs[name])} (needs {'>=' if higher else '<='} "
                       f"{100 * bound:.0f} %)")
    return out


def git_commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def demo_options(ap: argparse.ArgumentParser, text: str) -> list[str]:
    """``--demo-args`` split as a shell would, and checked by demo.py's own parser: a one-line error (exit 2)
    before any run, not a failure of the first run's demo."""
    try:
        opts = shlex.split(text)
    except ValueError as e:
        ap.error(f"--demo-args {text!r}: {e}")
    demo = build_parser()
    demo.error = lambda msg: ap.error(f"--demo-args {text!r}: {msg}")  # one line, named after bench_demo's option
    demo.set_defaults(**{o[2:].replace("-", "_"): None for o in BENCH_OWNS})  # to see them given (abbreviated too)
    checked = demo.parse_args(opts)
    owned = [o for o in BENCH_OWNS if getattr(checked, o[2:].replace("-", "_")) is not None]
    if owned:
        ap.error(f"--demo-args: {owned[0]} is set by bench_demo for every run")
    if checked.overrides:
        ap.error(f"--demo-args: {checked.overrides[0]!r} is an osum-train override: give it after bench_demo's "
                 "options")
    check_options(demo, checked)
    return opts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="how many corpus seeds (default 5)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--perturb", type=float, default=1e-6,
                    help="std of the feature noise of the extra run (0 = no perturbation run)")
    ap.add_argument("--perturb-seed", type=int, help="the seed perturbed (default: the first)")
    ap.add_argument("--perturb-tolerance", type=float, default=0.05,
                    help="largest WER change the perturbation may cause (default 0.05, i.e. 5 points)")
    ap.add_argument("--out", default="/tmp/bench_demo")
    ap.add_argument("--demo-args", default="",
                    help="options for every scripts/demo.py run, one shell-quoted string (e.g. '--listen-until 0.05')")
    ap.add_argument("--write-reference", action="store_true",
                    help=f"store the spread in {REFERENCE.relative_to(ROOT)} (from a clean committed tree)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for osum-train (every run)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if not args.perturb >= 0:
        ap.error("--perturb must be >= 0")
    demo_args = demo_options(ap, args.demo_args)
    pseed = args.first_seed if args.perturb_seed is None else args.perturb_seed
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.perturb and pseed not in seeds:
        ap.error(f"--perturb-seed {pseed} is not one of the seeds run ({seeds[0]}..{seeds[-1]})")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    command = shlex.join(["python", "scripts/bench_demo.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"bench_demo at {commit}: seeds {seeds}" + (f", then seed {pseed} with data.feature_noise={args.perturb}"
                                                     if args.perturb else ""), flush=True)
    runs: dict[int, dict] = {}
    perturbed = None
    for seed in seeds:
        runs[seed] = run_demo(out / f"seed{seed}", seed, [*demo_args, *args.overrides], out / f"seed{seed}.log")
        print(f"  seed {seed}: " + ", ".join(f"{n} {fmt(n, runs[seed][n])}" for n in (*FIGURES, "total_s")
                                              if n in runs[seed]), flush=True)
        # every finished run is kept at once, so an interrupted bench still has its figures
        (out / "runs.jsonl").open("a", encoding="utf-8").write(json.dumps({"commit": commit, "seed": seed,
                                                                          **runs[seed]}) + "\n")
        if args.perturb and seed == pseed:  # its twin at once, on the same corpus
            perturbed = run_demo(out / f"seed{pseed}_perturbed", pseed,
                                 ["--corpus", str(out / f"seed{pseed}" / "corpus"), *demo_args, *args.overrides,
                                  f"data.feature_noise={args.perturb}"], out / f"seed{pseed}_perturbed.log")
            print(f"  seed {seed} + {args.perturb:g} feature noise: "
                  + ", ".join(f"{n} {fmt(n, perturbed[n])}" for n in (*FIGURES, "total_s") if n in perturbed),
                  flush=True)
            (out / "runs.jsonl").open("a", encoding="utf-8").write(json.dumps(
                {"commit": commit, "seed": seed, "feature_noise": args.perturb, **perturbed}) + "\n")

    names = [*FIGURES, "total_s"]
    sp = spread(list(runs.values()), names)
    lines = [f"# bench_demo: {len(seeds)} corpus seeds at `{commit}`", "", f"command: `{command}`", "",
             "| run | " + " | ".join(FIGURES[n][0] if n in FIGURES else "time (demo.py)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for seed, r in runs.items():
        lines.append(f"| seed {seed} | " + " | ".join(fmt(n, r[n]) if n in r else "-" for n in names) + " |")
    if perturbed:
        lines.append(f"| seed {pseed} + {args.perturb:g} feature noise | "
                     + " | ".join(fmt(n, perturbed[n]) if n in perturbed else "-" for n in names) + " |")
    for i, what in enumerate(("min", "median", "max")):
        lines.append(f"| **{what}** over {len(seeds)} seeds | "
                     + " | ".join(fmt(n, sp[n][i]) if n in sp else "-" for n in names) + " |")
    lines.append("")
    unmatched = [s for s, r in runs.items() if r["corpus_matches_reference"] is not True]
    if unmatched:
        lines.append(f"corpus seeds {unmatched}: speech NOT the reference corpus (scripts/demo_corpus_sha256.json)")
    bad = [f for seed, r in runs.items() for f in failures(f"seed {seed}", r)]
    if perturbed:
        bad += failures(f"seed {pseed} perturbed", perturbed)
        for n in ("test_wer", "voices_wer"):
            d = perturbed[n] - runs[pseed][n]
            lines.append(f"perturbation ({args.perturb:g}): {FIGURES[n][0]} {fmt(n, runs[pseed][n])} -> "
                         f"{fmt(n, perturbed[n])} ({100 * d:+.1f} points)")
            if abs(d) > args.perturb_tolerance:
                bad.append(f"perturbation moved {FIGURES[n][0]} by {100 * d:+.1f} points "
                           f"(tolerance {100 * args.perturb_tolerance:.0f})")
    lines.append("")
    lines.append("acceptance (issue 32): " + ("MET for every run" if not bad else "NOT MET: " + "; ".join(bad)))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (out / "bench.md").write_text(text, encoding="utf-8")
    result = {"commit": commit, "command": command, "date": datetime.date.today().isoformat(),
              "runs": [{"seed": s, **r} for s, r in runs.items()], "spread": sp,
              "perturbed": None if perturbed is None else {"seed": pseed, "feature_noise": args.perturb, **perturbed},
              "acceptance_failures": bad}
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.write_reference:
        if commit.endswith("+dirty"):
            print("bench_demo: not writing the reference: the tree has uncommitted changes", file=sys.stderr)
            return 1
        REFERENCE.write_text(json.dumps({k: result[k] for k in ("commit", "command", "date", "runs", "spread",
                                                                  "perturbed")}, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {REFERENCE}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
