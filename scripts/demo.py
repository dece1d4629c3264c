#!/usr/bin/env python
"""`make demo`: the whole product, end to end, on the espeak-ng demo corpus, on a CPU.

    python scripts/demo.py [--out demo] [--steps N] [--devices 8] [--keep-corpus]

1. builds the corpus (scripts/make_demo_corpus.py: train as tar shards, dev/test as raw data.lists, tokenizer)
2. trains the tiny OSUM from scratch with ``osum-train configs/demo.yaml`` on 2 simulated CPU devices, mesh
   data 1 x fsdp 2 (parameters sharded), in two stages:
   a. listening: steps on ``train_tags.list``, every training utterance asking only for ``<AGE> <GENDER>``, at a
      constant learning rate (``--listen-lr``, 1e-3), until the mean training loss of the last 20 steps is under
      ``--listen-until`` (0.03: the tags are settled; ``train.stop_below_loss``), at most ``--listen-steps`` (400);
   b. the task mix: the config's steps on the training shards, starting from the listening run's encoder and
      adapter under a fresh LLM (``train.init_from`` with ``train.init_parts=[encoder,adapter]``;
      ``--listen-parts all`` takes its LLM too), with checkpoints and dev evaluation (JAX greedy decoding).
   Without the first stage, a model that learned to transcribe first could lose the voice's pitch in its
   adapter and never learn gender: 2 corpus seeds of 5 left gender at 57 and 83 %, however long they trained.
   On tags alone the only way down is to listen. Taking the whole listening model, though, seed 2 learned
   gender and never aligned its words (test WER 80.7 %). Taking its encoder and adapter alone, seeds 2 and 3
   learned gender and their words (0.0 %), and so did seeds 0 and 1 of the 7-voice corpus (one run each;
   docs/benchmarks.md, Demo, has the spread over corpus seeds).
3. exports the run with ``osum-convert export-torch`` (a Hugging Face style safetensors package)
4. transcribes and tags the two held-out test splits (unseen word combinations with the training voices, and
   with held-out voices) with ``osum-infer`` (PyTorch, no JAX)
5. scores each with ``osum-eval`` (WER/CER, tag accuracy + confusion matrices)
6. prints a report (loss curve, WER/CER, tag accuracy vs chance, timings, artefacts) and writes
   ``OUT/report.md`` and ``OUT/loss.png``

Every number in the report comes from this run. Each stage runs the real CLI in a subprocess, exactly as a user
would type it; the commands are printed and kept in ``OUT/commands.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 15 * 60
LISTEN_STEPS = 400  # the listening stage's cap (the docstring says why): at 1e-3 (548deee's bench) the tags' loss
# was under 0.03 (mean of 20 steps) by steps 281-394 on seeds 0, 1 and 4; seeds 2 and 3 ran to the cap (seed 3 at
# 0.04), and both kept gender and learned their words
LISTEN_UNTIL, LISTEN_WINDOW = 0.03, 20  # it stops once the tags are settled. At 2e-3 and an older corpus
# (0ddbed1), 400 steps for every seed left seeds 0 and 2, which heard them by step ~200, 200 more steps on tags
# alone, and their task mix found the words late (test WER 34 % on seed 0 with 1e-6 feature noise); so it stopped
# at 0.1. At 1e-3 (f283af5) 0.1 came at steps 102-166, too early for seed 3: it lost gender in the task mix (dev
# gender 40 % at step 900, test 54 %); listening on to 0.03 (the cap, 400 steps, at loss 0.04) it kept it (100 %)
# and its words (test WER 0.3 %). docs/benchmarks.md (Demo) has the spread over corpus seeds
# The listening stage's constant learning rate. At the task mix's peak (2e-3) the tags' loss bounced between 0.13
# and 0.37 on seed 4 (5a2b5f5's corpus) for 800 steps and gender was never heard (test gender 75 % after the task
# mix), and seed 1 was not under 0.1 by step 400; at 1e-3 seeds 0-4 were under 0.1 by steps 102-166 (one run
# each, the listening stage alone)
LISTEN_LR = 1e-3
CHANCE = {"gender": 1 / 2, "age": 1 / 3}


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


class Stages:
    def __init__(self, out: Path):
        self.out = out
        self.times: dict[str, float] = {}
        self.commands: list[str] = []

    def run(self, name: str, cmd: list[str], env: dict | None = None, log: Path | None = None) -> None:
        shown = " ".join(shlex.quote(c) for c in cmd)
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        self.commands.append(f"{envs} {shown}".strip())
        print(f"\n=== {name}\n$ {self.commands[-1]}", flush=True)
        t0 = time.time()
        full_env = dict(os.environ, **(env or {}))
        if log is None:
            rc = subprocess.run(cmd, cwd=ROOT, env=full_env).returncode
        else:  # progress on the console, everything in the log
            with open(log, "w", encoding="utf-8") as f:
                p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
                for line in p.stdout:
                    f.write(line)
                    if " absl:" not in line and "tensorboardX" not in line:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                rc = p.wait()
        self.times[name] = time.time() - t0
        if rc != 0:
            where = f" (log: {log})" if log else ""
            raise SystemExit(f"demo: stage '{name}' failed with exit code {rc}{where}")


def loss_curve(metrics: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(ln) for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]


def plot_loss(train: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("osum-jax demo: tiny OSUM trained from scratch on espeak-ng speech")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def pooled(report: dict) -> dict:
    """WER/CER over every transcribing task; tag accuracy over every task that asks for the tag."""
    out: dict = {}
    for metric in ("wer", "cer"):
        errs = sum(r[metric]["errors"] for r in report["tasks"].values() if metric in r)
        toks = sum(r[metric]["ref_tokens"] for r in report["tasks"].values() if metric in r)
        if toks:
            out[metric] = (errs / toks, errs, toks)
    for field in CHANCE:
        ok = sum(r["tags"][field]["correct"] for r in report["tasks"].values() if field in r.get("tags", {}))
        tot = sum(r["tags"][field]["total"] for r in report["tasks"].values() if field in r.get("tags", {}))
        if tot:
            out[field] = (ok / tot, ok, tot)
    return out


# WER of guessing: the right number of words drawn uniformly from the 20-word vocabulary (19 of 20 wrong)
CHANCE_WER = 19 / 20

# the documented spread (docs/benchmarks.md), written by scripts/bench_demo.py --write-reference
REFERENCE = Path(__file__).with_name("demo_reference.json")
TEST_TITLE = "test: unseen word combinations, training voices"
VOICES_TITLE = "test-voices: unseen word combinations, held-out voices"
# figure -> (label, summary split, summary metric, higher is better, acceptance bound from issue 32)
FIGURES = {"test_wer": ("test WER", TEST_TITLE, "wer", False, 0.10),
           "voices_wer": ("held-out voices WER", VOICES_TITLE, "wer", False, 0.20),
           "test_gender": ("test gender acc.", TEST_TITLE, "gender", True, 0.95),
           "voices_gender": ("held-out voices gender acc.", VOICES_TITLE, "gender", True, 0.95),
           "test_age": ("test age acc.", TEST_TITLE, "age", True, 0.95),
           "voices_age": ("held-out voices age acc.", VOICES_TITLE, "age", True, 0.95)}


def misses_target(name: str, value: float) -> bool:
    """Whether the figure ``name`` misses issue 32's bound (``FIGURES``)."""
    _, _, _, higher, bound = FIGURES[name]
    return value < bound if higher else value > bound


def below_target(figs: dict[str, float]) -> list[str]:
    """Each figure of ``figs`` that misses issue 32's bound, as ``label value (target ...)``."""
    return [f"{label} {100 * figs[name]:.1f} % (target {'>=' if higher else '<='} {100 * bound:.0f} %)"
            for name, (label, _, _, higher, bound) in FIGURES.items()
            if name in figs and misses_target(name, figs[name])]


def figures(summary: dict) -> dict[str, float]:
    """The demo's headline figures from its summary.json (fractions; ``total_s`` in seconds)."""
    out = {name: summary[split][metric] for name, (_, split, metric, _, _) in FIGURES.items()
           if metric in summary.get(split, {})}
    out["total_s"] = sum(summary["time_s"].values())
    return out


def against_reference(figs: dict[str, float], reference: dict | None) -> list[str]:
    """The report's section that sets this run beside the documented spread and says when it falls outside."""
    lines = ["## this run against the documented spread", ""]
    if reference is None:
        return lines + [f"(no documented spread: {REFERENCE.name} is missing)", ""]
    spread = reference["spread"]
    lines += [f"documented: {len(reference['runs'])} corpus seeds at commit `{reference['commit']}` "
              f"(`{reference['command']}`, {reference['date']}; docs/benchmarks.md)", "",
              "| figure | this run | documented min / median / max | |", "|---|---|---|---|"]
    outside = []
    for name, (label, _, _, higher, bound) in FIGURES.items():
        if name not in figs or name not in spread:
            continue
        lo, med, hi = spread[name]
        v = figs[name]
        worse = v < lo if higher else v > hi
        better = v > hi if higher else v < lo
        verdict = "**outside: worse**" if worse else "outside: better" if better else "inside"
        if worse:
            outside.append(f"{label} {100 * v:.1f} % (documented {100 * lo:.1f}-{100 * hi:.1f} %)")
        lines.append(f"| {label} | {100 * v:.1f} % | {100 * lo:.1f} / {100 * med:.1f} / {100 * hi:.1f} % | "
                     f"{verdict} |")
    if "total_s" in spread:
        lo, med, hi = spread["total_s"]
        lines.append(f"| time (demo.py, without the venv) | {figs['total_s']:.0f} s "
                     f"| {lo:.0f} / {med:.0f} / {hi:.0f} s "
                     f"| {'slower' if figs['total_s'] > hi else 'inside' if figs['total_s'] >= lo else 'faster'} "
                     "(depends on the machine and its load) |")
    lines.append("")
    if outside:
        lines.append("**This run falls outside the documented spread**: " + "; ".join(outside) + ". The documented "
                     "figures are not what this run gives; see docs/benchmarks.md (Demo) for what is known to move "
                     "them, and please report it with OUT/report.md and OUT/corpus/corpus.json.")
    else:
        lines.append("Every accuracy figure of this run is inside (or better than) the documented spread.")
    short = below_target(figs)
    if short:
        lines += ["", "**Below the demo's target** (issue 32): " + "; ".join(short) + ". The recipe does not yet "
                  "reach it on every corpus seed; docs/benchmarks.md (Demo) says which figures miss it and why."]
    return lines + [""]


def corpus_line(corpus: dict) -> str:
    ref = corpus.get("matches_reference")
    what = (f"corpus speech: {corpus.get('espeak_ng', 'espeak-ng ?')}, PCM sha256 {corpus.get('pcm_sha256', '?')[:16]}")
    if ref is True:
        return what + ": the same speech as the reference corpus of this seed (scripts/demo_corpus_sha256.json)."
    if ref is False:
        return (what + ": **different from the reference corpus of this seed** (scripts/demo_corpus_sha256.json): "
                "this espeak-ng speaks differently from the one the documented figures were made with, so they "
                "need not hold here.")
    return what + " (no reference checksum for this seed and size)."


def examples_by_task(refs: dict[str, dict], hyps: list[dict], per_kind: int = 2) -> dict[str, list[tuple]]:
    """Per task, up to ``per_kind`` right and ``per_kind`` wrong test utterances: ``(key, ref, hyp, ok)``."""
    out: dict[str, list[tuple]] = {}
    for h in hyps:
        r = refs.get(h["key"])
        if r is None:
            continue
        ok = h.get("text", "").strip().lower() == r["txt"].strip().lower()
        got = out.setdefault(r["task"], [])
        if sum(1 for x in got if x[3] == ok) < per_kind:
            got.append((h["key"], r["txt"], h.get("text", ""), ok))
    return out


def split_section(title: str, report: dict, examples: dict[str, list[tuple]]) -> list[str]:
    lines = [f"### {title}", ""]
    pool = pooled(report)
    if "wer" in pool:
        lines.append(f"- WER **{100 * pool['wer'][0]:.1f} %** ({pool['wer'][1]}/{pool['wer'][2]} words), "
                     f"CER {100 * pool['cer'][0]:.1f} % over all transcribing tasks; chance (random words of the "
                     f"right length) {100 * CHANCE_WER:.0f} %")
    for field, chance in CHANCE.items():
        if field in pool:
            lines.append(f"- {field} accuracy **{100 * pool[field][0]:.1f} %** ({pool[field][1]}/{pool[field][2]}); "
                         f"chance {100 * chance:.0f} %")
    lines += ["", "| task | utterances | WER | CER | gender acc. | age acc. |", "|---|---|---|---|---|---|"]
    for task, r in report["tasks"].items():
        cell = lambda m: f"{100 * r[m]['rate']:.1f} %" if m in r else "-"  # noqa: E731
        tag = lambda f: f"{100 * r['tags'][f]['accuracy']:.1f} %" if f in r.get("tags", {}) else "-"  # noqa: E731
        lines.append(f"| `{task}` | {r['utterances']} | {cell('wer')} | {cell('cer')} | {tag('gender')} | "
                     f"{tag('age')} |")
    if examples:
        lines += ["", "examples per task (reference -> hypothesis; the first right and wrong ones in file order):", ""]
        for task, rows in examples.items():
            for key, ref, hyp, ok in sorted(rows, key=lambda x: not x[3]):
                lines.append(f"- `{task}` {'right' if ok else '**wrong**'} `{key}`: {ref!r} -> {hyp!r}")
    return lines + [""]


def report_text(out: Path, corpus: dict, train: list[dict], evals: list[dict], results: dict[str, tuple],
                stages: Stages, devices: int, mesh: dict, compared: list[str] = (),
                listened: list[dict] = (), listen_parts: list[str] = ()) -> str:
    total = sum(stages.times.values())
    k = max(1, len(train) // 10)
    first, last = train[0], train[-1]
    best = min(train, key=lambda r: r["loss"])
    lines = ["# osum-jax demo report", ""]
    sp = corpus["splits"]
    held = corpus.get("held_out_voices", {})
    lines += [f"corpus: espeak-ng speech, {sp['train']['utterances']} train ({sp['train']['minutes']:.1f} min) / "
              f"{sp['dev']['utterances']} dev / {sp['test']['utterances']} test / "
              f"{sp['test_voices']['utterances']} test-voices utterances over a 20-word vocabulary, spoken as isolated "
              f"words (each synthesised alone, in its own 0.8 s slot).", "",
              "What is held out:",
              "- **word combinations**: every dev and test phrase has 2-3 words and occurs in no other split; every "
              "single word does occur in training (the vocabulary is closed), so the test measures recognising "
              "words in new sequences, not new words;",
              f"- **voices**: {', '.join(f'{v} ({g})' for g, v in held.items())} occur only in the test-voices split "
              f"(train uses the other {len(sp['train']['voices'])} voices); the test split uses the training voices.",
              "", corpus_line(corpus), ""]
    lines += ["## training (osum-train, JAX)", ""]
    if listened:
        end = listened[-1]
        why = (f", ended when the mean train loss of the last {LISTEN_WINDOW} steps fell under the --listen-until "
               "threshold" if "stopped_early_at" in end else ", all of --listen-steps")
        lines.append(f"- listening stage: {end['step']} steps{why} on the training utterances asking only for "
                     f"`<AGE> <GENDER>` (train_tags.list), train loss step {listened[0]['step']} "
                     f"{listened[0]['loss']:.3f} -> step {listened[-1]['step']} {listened[-1]['loss']:.3f}; the task "
                     f"mix starts from its "
                     + (f"{' and '.join(listen_parts)} (the rest afresh)" if listen_parts else "weights"))
    lines += [
              f"- {last['step']} optimizer steps on {devices} simulated CPU devices (mesh data {mesh['data']} x "
              f"fsdp {mesh['fsdp']} x tensor {mesh['tensor']}),"
              f" {last.get('compiled_shapes', '?'):.0f} compiled batch shapes",
              f"- train loss: step {first['step']} {first['loss']:.3f} -> step {last['step']} {last['loss']:.3f} "
              f"(lowest {best['loss']:.3f} at step {best['step']}); mean per tenth of the run: "
              + " ".join(f"{sum(r['loss'] for r in train[i:i + k]) / len(train[i:i + k]):.2f}"
                         for i in range(0, len(train), k)),
              ]
    if evals:
        lines.append("- dev loss: " + ", ".join(f"step {r['step']} {r['eval/loss']:.3f}" for r in evals))
    steady = sorted(r["step_time_s"] for r in train[len(train) // 4:])
    if steady:
        lines.append(f"- median step time {steady[len(steady) // 2]:.2f} s")
    lines += ["", "## held-out tests (osum-infer on the exported torch package, scored by osum-eval)", ""]
    for title, (report, examples) in results.items():
        lines += split_section(title, report, examples)
    lines += list(compared)
    lines += ["## time", ""]
    lines += [f"- {name}: {sec:.0f} s" for name, sec in stages.times.items()]
    lines.append(f"- total: {total:.0f} s ({total / 60:.1f} min; budget {BUDGET_S // 60} min)")
    lines += ["", "## artefacts", "",
              f"- corpus: {out / 'corpus'} (train shards, dev/test lists, tokenizer)",
              f"- run (orbax checkpoints, metrics.jsonl, TensorBoard): {out / 'run'}"
              + (f" (the listening stage's: {out / 'listen'})" if listened else ""),
              f"- torch package: {out / 'package'}",
              f"- test results: {out / 'results.jsonl'}, {out / 'results_voices.jsonl'}",
              f"- eval reports and confusion PNGs: {out / 'eval'}, {out / 'eval_voices'}",
              f"- loss curve: {out / 'loss.png'}",
              f"- the commands, as run: {out / 'commands.sh'}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """demo.py's options (scripts/bench_demo.py checks its ``--demo-args`` with it before any run)."""
    ap = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo", help="where everything goes (default: ./demo)")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, help="optimizer steps of the task mix (default: the config's)")
    ap.add_argument("--listen-steps", type=int, default=LISTEN_STEPS,
                    help=f"steps of the listening stage, tags only, before the task mix (default {LISTEN_STEPS}; "
                         "0 = none)")
    ap.add_argument("--listen-until", type=float, default=LISTEN_UNTIL,
                    help=f"end the listening stage once its mean training loss over {LISTEN_WINDOW} steps is below "
                         f"this (default {LISTEN_UNTIL}; 0 = run all --listen-steps)")
    ap.add_argument("--listen-lr", type=float, default=LISTEN_LR,
                    help=f"the listening stage's constant learning rate (default {LISTEN_LR:g}; the task mix keeps the "
                         "config's)")
    ap.add_argument("--listen-parts", default="encoder,adapter",
                    help="what the task mix takes from the listening stage, comma-separated model parts "
                         "(train.init_parts; default encoder,adapter: the LLM starts afresh; 'all': everything)")
    ap.add_argument("--devices", type=int, default=2, help="simulated CPU devices (the config's mesh: fsdp 2)")
    ap.add_argument("--train-size", type=int, help="training utterances (default: the corpus script's)")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--keep-corpus", action="store_true", help="reuse OUT/corpus if it exists")
    ap.add_argument("--corpus", help="use this existing corpus (made by make_demo_corpus.py) instead of making one")
    ap.add_argument("--batch-size", type=int, default=16, help="osum-infer batch size")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for osum-train")
    return ap


def check_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The values argparse cannot check, each a one-line error (exit 2); returns the --listen-parts named."""
    if args.listen_steps < 0:
        ap.error(f"--listen-steps {args.listen_steps}: expected 0 (no listening stage) or more")
    if not args.listen_until >= 0:
        ap.error(f"--listen-until {args.listen_until}: expected a loss > 0, or 0 (no early end)")
    if not args.listen_lr > 0 or args.listen_lr == float("inf"):
        ap.error(f"--listen-lr {args.listen_lr}: expected a learning rate > 0")
    from osum_jax.config import INIT_PARTS  # light: no JAX

    parts = [] if args.listen_parts == "all" else [p for p in args.listen_parts.split(",") if p]
    if not parts and args.listen_parts != "all" or set(parts) - set(INIT_PARTS):
        ap.error(f"--listen-parts {args.listen_parts}: expected 'all' or names from {','.join(INIT_PARTS)}")
    return parts


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    parts = check_options(ap, args)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, listen, run, pkg = out / "corpus", out / "listen", out / "run", out / "package"
    if args.corpus:
        corpus = Path(args.corpus).resolve()
        if not (corpus / "corpus.json").is_file():
            ap.error(f"--corpus {args.corpus}: no corpus.json there (make one with scripts/make_demo_corpus.py)")
    stages = Stages(out)
    t_start = time.time()

    if not args.corpus and not (args.keep_corpus and (corpus / "corpus.json").is_file()):
        size = ["--train", str(args.train_size)] if args.train_size else []
        stages.run("corpus", [sys.executable, "scripts/make_demo_corpus.py", "--out", str(corpus),
                              "--seed", str(args.seed), *size])
    if args.listen_steps and not (corpus / "train_tags.list").is_file():
        ap.error(f"{corpus}: no train_tags.list for the listening stage (a corpus made before it: make it again "
                 "with scripts/make_demo_corpus.py, or pass --listen-steps 0)")
    for old in (listen, run, pkg, out / "eval", out / "eval_voices"):
        shutil.rmtree(old, ignore_errors=True)  # every figure in the report comes from this run

    common = [f"data.dev={corpus / 'dev.list'}", f"data.tokenizer={corpus / 'tokenizer'}",
              f"data.prompts={corpus / 'prompts.yaml'}"]
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}", "JAX_PLATFORMS": "cpu"}
    overrides = [f"data.train={corpus / 'shards' / 'shards_list.txt'}", *common, f"train.output_dir={run}"]
    if args.listen_steps:
        stages.run("listen", [_bin("osum-train"), args.config, f"data.train={corpus / 'train_tags.list'}", *common,
                              f"train.learning_rate={args.listen_lr:g}", *args.overrides,
                              f"train.output_dir={listen}", f"train.steps={args.listen_steps}",
                              "train.schedule=constant", "train.eval_every=0",
                              f"train.checkpoint_every={args.listen_steps}",
                              f"train.stop_below_loss={args.listen_until:g}", f"train.stop_window={LISTEN_WINDOW}"],
                   env=env, log=out / "listen.log")
        overrides.append(f"train.init_from={listen}")
        if parts:
            overrides.append(f"train.init_parts=[{','.join(parts)}]")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    overrides += args.overrides
    stages.run("train", [_bin("osum-train"), args.config, *overrides], env=env, log=out / "train.log")
    stages.run("export", [_bin("osum-convert"), "export-torch", str(run), "--tokenizer", str(corpus / "tokenizer"),
                          "--out", str(pkg), "--dtype", "fp32", "--force"])
    tests = {"test": ("test.list", "results.jsonl", "eval"),
             "test-voices": ("test_voices.list", "results_voices.jsonl", "eval_voices")}
    for name, (ref, hyp, ev) in tests.items():
        stages.run(f"infer {name}", [_bin("osum-infer"), "--model", str(pkg), "--data", str(corpus / ref),
                                     "--device", "cpu", "--dtype", "fp32", "--batch-size", str(args.batch_size),
                                     "--out", str(out / hyp), "--overwrite"])  # a rerun of make demo replaces them
        stages.run(f"eval {name}", [_bin("osum-eval"), "--ref", str(corpus / ref), "--hyp", str(out / hyp),
                                    "--out", str(out / ev)], log=out / f"{ev}.log")

    train, evals = loss_curve(run / "metrics.jsonl")
    listened = loss_curve(listen / "metrics.jsonl")[0] if args.listen_steps else []
    plot_loss(train, evals, out / "loss.png")
    results = {}
    for name, (ref, hyp, ev) in tests.items():
        report = json.loads((out / ev / "report.json").read_text(encoding="utf-8"))
        refs = {json.loads(ln)["key"]: json.loads(ln) for ln in (corpus / ref).read_text().splitlines()}
        hyps = [json.loads(ln) for ln in (out / hyp).read_text().splitlines()]
        title = TEST_TITLE if name == "test" else VOICES_TITLE
        results[title] = (report, examples_by_task(refs, hyps))
    corpus_info = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))
    (out / "commands.sh").write_text("#!/usr/bin/env bash\n# the demo's commands, as run by scripts/demo.py\n"
                                     + "\n".join(stages.commands) + "\n", encoding="utf-8")
    import yaml

    run_train = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]
    mesh = run_train["mesh"]
    if mesh.get("fsdp") == -1:  # -1 fills the remaining devices
        mesh["fsdp"] = args.devices // (mesh["data"] * mesh["tensor"])
    summary = {title: {k: v[0] for k, v in pooled(rep).items()} for title, (rep, _) in results.items()}
    summary["time_s"] = dict(stages.times)
    summary["corpus"] = {k: corpus_info.get(k) for k in ("seed", "espeak_ng", "pcm_sha256", "matches_reference")}
    reference = json.loads(REFERENCE.read_text(encoding="utf-8")) if REFERENCE.is_file() else None
    compared = against_reference(figures(summary), reference)
    text = report_text(out, corpus_info, train, evals, results, stages, args.devices, mesh, compared, listened,
                       list(run_train.get("init_parts") or ()))
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print("\n" + text)
    total = time.time() - t_start
    if total > BUDGET_S:
        print(f"note: the demo took {total / 60:.1f} min, over its {BUDGET_S // 60}-minute budget", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
