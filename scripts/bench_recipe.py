"""OSUM's recipe on a pod, as the compilers see it: OSUM's global batch, a stated length mix, the default flags.

    python scripts/bench_recipe.py --json-dir bench_json/recipe          # v5p x 16, data 16, 5 buckets
    python scripts/bench_recipe.py --json-dir bench_json/recipe --reuse  # re-read the compiled rows

``--reuse`` keeps a compiled row only where this tree lowers the bucket to the same program (the sha256 of its
StableHLO, ``program_sha256`` in the row: seconds to check, where the compile takes minutes); any other row is
compiled again. The summary names each reused row's ``same_program_at`` commit.

1. ``osum-train configs/osum_full.yaml --plan --global-frames 374400`` (OSUM: 24 GPUs x accum_grad 4 x 3900
   frames) proposes the per-device budget x accumulation for the target (the fewest accumulation steps that
   leave 20 % of HBM free by the ``--plan`` estimate);
2. the pipeline's own batcher packs the length mix (``osum_jax.perf.plan.LENGTH_MIX``) with that proposal,
   per device, giving each bucket's share of the batches and the padding waste;
3. the ``--buckets`` buckets holding most of the mix's padded frames are compiled for the target with the
   default flags of ``configs/osum_full.yaml`` (``--plan --target T --bucket FxL``, one process each);
4. the mix's MFU over the compiled buckets is ``sum(n_b x model FLOPs_b) / sum(n_b x step_b) / peak``, n_b the
   mix's batches of bucket b; the buckets left out are named with their share.

Each compile of the full model takes minutes and several GB here: run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from osum_jax.perf.plan import OSUM_GLOBAL_FRAMES  # noqa: E402


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _write(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, whole or not at all (a temporary sibling, fsynced, renamed)."""
    from osum_torch_infer.files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tpu:v5p:2x2x4")
    ap.add_argument("--mesh", nargs="*", default=["train.mesh.data=16", "train.mesh.fsdp=1"])
    ap.add_argument("--global-frames", type=int, default=OSUM_GLOBAL_FRAMES)
    ap.add_argument("--buckets", type=int, default=5, help="compile the buckets with the most padded frames")
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--reuse", action="store_true", help="use compiled rows already in --json-dir")
    args = ap.parse_args(argv)

    from osum_jax.config_loading import load_config
    from osum_jax.data.pipeline import BucketSpec, packing_report, static_prompt_len
    from osum_jax.perf.aot import parse_target
    from osum_jax.perf.plan import LENGTH_MIX, length_mix, propose_recipe

    target = parse_target(args.target)
    cfg = load_config(str(ROOT / "configs/osum_full.yaml"), args.mesh)
    prop = propose_recipe(cfg, target.devices, target.chip.hbm_gb, args.global_frames,
                          platform="tpu" if target.chip.platform == "tpu" else "gpu")
    if prop["proposal"] is None:
        print("no per-device budget fits this target", file=sys.stderr)
        return 1
    chosen = load_config(str(ROOT / "configs/osum_full.yaml"), args.mesh + prop["overrides"])
    spec = BucketSpec.from_config(chosen.data, devices=1, prompt_len=static_prompt_len(chosen.data))
    mix = packing_report(spec, length_mix(prompt=spec.prompt_len, max_frames=chosen.data.max_frames,
                                          max_label=chosen.data.max_label_tokens))
    ranked = sorted(mix["buckets"].items(), key=lambda kv: -kv[1]["padded_frames"])
    picked = ranked[:args.buckets]
    out_dir = Path(args.json_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, checked = [], {}
    for name, stats in picked:
        path = out_dir / f"{target.spec.replace(':', '_')}_{name}.json"
        cmd = [sys.executable, "-m", "osum_jax.train.cli", "configs/osum_full.yaml", "--plan", "--target",
               args.target, "--json", "--bucket", name, *args.mesh, *prop["overrides"]]
        compile_it = not (args.reuse and path.exists())
        if not compile_it:
            # a compiled row is this tree's only if it is the same program: lower it here (seconds) and compare
            from osum_jax.perf.aot import lowered_sha256

            here = lowered_sha256(chosen, args.target, tuple(int(v) for v in name.split("x")))
            was = json.loads(path.read_text()).get("program_sha256")
            if was == here:
                checked[name] = _commit()
            else:
                print(f"{path}: {'another program' if was else 'no program_sha256'} than this tree's; compiling "
                      f"it again", file=sys.stderr)
                compile_it = True
        if compile_it:
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if run.returncode:
                print(f"{name}: {' '.join(cmd)} failed:\n{run.stderr[-3000:]}", file=sys.stderr)
                return 1
            r = json.loads(run.stdout)
            r.update(commit=_commit(), wall_s=time.perf_counter() - t0,
                     command="osum-train " + " ".join(cmd[3:]))
            _write(path, r)
        r = json.loads(path.read_text())
        rows.append((name, stats, r))
    peak = target.chip.peak_tflops * 1e12
    key = "step_seconds" if "step_seconds" in rows[0][2] else "step_ms_bound_per_kernel"
    secs = {n: (r[key] if key == "step_seconds" else r[key] / 1e3) for n, _, r in rows}
    num = sum(s["batches"] * r["model_flops"] for n, s, r in rows)
    den = sum(s["batches"] * secs[n] for n, s, r in rows)
    covered = sum(s["padded_frames"] for _, s, _ in rows) / mix["total"]["padded_frames"]
    t = mix["total"]
    summary = {
        "commit": _commit(),
        "target": args.target, "mesh": args.mesh, "global_frames": args.global_frames,
        "proposal": prop["overrides"], "length_mix": LENGTH_MIX, "basis": rows[0][2].get("step_basis"),
        "mix_mfu_compiled_buckets": num / den / peak, "covered_padded_frames": covered,
        "frame_waste": t["frame_waste"], "token_waste": t["token_waste"], "row_fill": t["row_fill"],
        "min_headroom": min(r["headroom"] for _, _, r in rows),
        "buckets": [{"bucket": n, "batches_in_mix": s["batches"], "share_padded_frames":
                     s["padded_frames"] / t["padded_frames"], "frame_waste": s["frame_waste"],
                     "batch_shape": r["batch_shape"], "step_ms": secs[n] * 1e3,
                     "mfu": r["model_flops"] / secs[n] / peak, "headroom": r["headroom"],
                     "compile_s": r["compile_seconds"], "commit": r.get("commit"), "command": r.get("command"),
                     "program_sha256": r.get("program_sha256"), "same_program_at": checked.get(n)}
                    for n, s, r in rows],
        "left_out": [{"bucket": n, "share_padded_frames": s["padded_frames"] / t["padded_frames"]}
                     for n, s in ranked[args.buckets:]],
    }
    _write(out_dir / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
