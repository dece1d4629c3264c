#!/usr/bin/env bash
# The project's GPU check in one command, on a lent GPU machine (docs/benchmarks.md, "Running the GPU check").
#
#   bash scripts/gpu_check.sh          # on the GPU machine, from the repo root, with .gpu_wheels/ carried
#   bash scripts/gpu_check.sh --cpu    # the same sequence on CPU with tiny settings (CI: tests/test_gpu_check.py)
#
# GPU mode: installs the wheels that scripts/gpu_prepare.sh downloaded (WHEELS/missing/*.whl; and WHEELS/pins/,
# the project's flax/optax/orbax-checkpoint, only if the image's own versions cannot import the train step)
# into a temporary --target folder, offline (pip --no-index), puts it and the repo on PYTHONPATH, then runs
#   1. scripts/gpu_smoke.py --device cuda                      (the torch runtime; full-size decode included)
#   2. scripts/bench_gpu_step.py --per-device 8, then 1        (the real OSUM train step on the GPU)
# each bench size first with the config's attention (auto), on a failure again with model.attention_impl=cudnn,
# then xla. Every step has its own timeout, cut to what is left of --budget (560 s: the device tool's command
# limit is 600 s), so the run ends in time. CPU mode uses the current venv (.venv/bin/python) and no wheels:
# gpu_smoke.py --device cpu --quick, then bench_gpu_step.py on configs/tiny.yaml with the config's own batch
# budget (--per-device 0), one step.
#
# Files go to --out, else $OUT (the device tool brings back what is written there), else ./gpu_check_out/:
# gpu_check.log (what is printed), env.txt, smoke.jsonl, steps.log (the steps' own output), bench_<N>.json (one
# per size that produced a result), summary.json. The last lines printed are the summary.
# Exit status: 0 all passed; 1 the smoke test failed (or could not run); 3 the smoke test passed but a bench size
# failed with every attention; 2 a bad argument.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
WHEELS=".gpu_wheels"
OUTDIR=""
BUDGET=""
SIZES=""
ATTN="default cudnn xla"
PY=""
PINS=auto

usage() { sed -n '2,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; cat <<'EOF'
Options:
  --cpu              CPU mode (tiny settings, current venv, no wheels)
  --wheels DIR       the carried wheels folder (default .gpu_wheels)
  --out DIR          where the files go (default $OUT, else gpu_check_out)
  --budget S         seconds for the whole run (default 560 on GPU, 400 on CPU)
  --sizes "8 1"      utterances per device for the bench runs (CPU default "0": the config's budget)
  --attn "default cudnn xla"   attention implementations to try, in order, until one passes
  --python PY        the interpreter (default python3 on GPU, .venv/bin/python on CPU)
  --pins | --no-pins install the pinned flax/optax/orbax-checkpoint always | never (default: if needed)
EOF
}
bad() { echo "gpu_check: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu; shift ;;
    --wheels) [ $# -ge 2 ] || bad "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || bad "--out needs a folder"; OUTDIR="$2"; shift 2 ;;
    --budget) [ $# -ge 2 ] || bad "--budget needs seconds"; BUDGET="$2"; shift 2 ;;
    --sizes) [ $# -ge 2 ] || bad "--sizes needs numbers"; SIZES="$2"; shift 2 ;;
    --attn) [ $# -ge 2 ] || bad "--attn needs names"; ATTN="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || bad "--python needs an interpreter"; PY="$2"; shift 2 ;;
    --pins) PINS=yes; shift ;;
    --no-pins) PINS=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad "unknown argument '$1' (see --help)" ;;
  esac
done

cd "$ROOT"
if [ "$MODE" = gpu ]; then
  : "${PY:=python3}" "${BUDGET:=560}" "${SIZES:=8 1}"
  SMOKE_ARGS=(--device cuda); SMOKE_CAP=240
  BENCH_ARGS=(); BENCH_CAP=210
  MIN_STEP=60 SIZE_RESERVE=120   # each later bench size keeps 120 s for its first attempt
else
  if [ -z "$PY" ]; then if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi; fi
  : "${BUDGET:=400}" "${SIZES:=0}"
  SMOKE_ARGS=(--device cpu --quick); SMOKE_CAP=180
  BENCH_ARGS=(--config configs/tiny.yaml --steps 1 --warmup 0); BENCH_CAP=240
  MIN_STEP=20 SIZE_RESERVE=30
  export JAX_PLATFORMS=cpu
fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || bad "--budget must be whole seconds, not '$BUDGET'"
for s in $SIZES; do [[ "$s" =~ ^[0-9]+$ ]] || bad "--sizes must be whole numbers, not '$s'"; done
for a in $ATTN; do
  case "$a" in default|auto|xla|cudnn|splash|pallas) ;; *) bad "--attn: unknown attention '$a'" ;; esac
done
[ -n "$SIZES" ] && [ -n "$ATTN" ] || bad "--sizes and --attn need at least one entry"
command -v "$PY" >/dev/null 2>&1 || bad "no Python interpreter '$PY'"

OUTDIR="${OUTDIR:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUTDIR" || bad "cannot make $OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
rm -f "$OUTDIR"/{gpu_check.log,env.txt,smoke.jsonl,steps.log,summary.json} "$OUTDIR"/bench_*.json
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $((BUDGET - SECONDS)); }
say() { printf 'gpu_check [%3ds] %s\n' "$SECONDS" "$*"; }
# step timeout: CAP, cut to what the budget leaves after RESERVE seconds kept for later steps (and 10 s for the
# summary); 0 when under MIN_STEP is left
step_timeout() {
  local t=$(($(left) - 10 - ${2:-0}))
  [ "$t" -gt "$1" ] && t="$1"
  if [ "$t" -ge "$MIN_STEP" ]; then echo "$t"; else echo 0; fi
}
# the exception line of a failed step's stderr (the last 'SomethingError: ...' line), else its last line
error_line() {
  local e
  e="$(grep -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt|Exit)\b' "$1" | tail -1)"
  [ -n "$e" ] || e="$(grep -v '^[[:space:]]*$' "$1" | tail -1)"
  echo "${e:0:240}" | tr '\t' ' '
}
append_log() {  # TITLE FILE: the step's own output into steps.log (its last 400 lines)
  { echo "===== $1"; tail -n 400 "$2"; echo; } >>"$OUTDIR/steps.log"
}

main() {
  say "mode $MODE, python $PY, budget ${BUDGET}s, files in $OUTDIR"

  # --- 0. packages ---------------------------------------------------------------------------------------------
  JAX_SIDE="image"
  local site="$WORK/site" probe=(-c "import scripts.bench_gpu_step, osum_jax.train.step, osum_jax.perf.aot, osum_jax.train.mesh")
  if [ "$MODE" = gpu ]; then
    local wdir="$WHEELS"
    case "$wdir" in /*) ;; *) wdir="$ROOT/$wdir" ;; esac
    local whl=("$wdir"/missing/*.whl)
    if [ -e "${whl[0]}" ]; then
      say "installing ${#whl[@]} carried wheels offline: $(cd "$wdir/missing" && ls *.whl | sed 's/-[0-9].*//' | tr '\n' ' ')"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        --find-links "$wdir/missing" "${whl[@]}" >"$WORK/pip.log" 2>&1 || { say "wheel install failed:"; tail -5 "$WORK/pip.log"; }
      append_log "pip install (missing)" "$WORK/pip.log"
    else
      say "no wheels in $WHEELS/missing/ (run 'bash scripts/gpu_prepare.sh' here and carry $WHEELS): the train step may not import"
    fi
    export PYTHONPATH="$ROOT:$site${PYTHONPATH#"$ROOT"}"
    install_pins() {
      local pw=("$wdir"/pins/*.whl)
      [ -e "${pw[0]}" ] || { say "no pinned wheels in $WHEELS/pins/"; return 1; }
      say "installing the pinned $(cd "$wdir/pins" && ls *.whl | sed 's/-py3.*//' | tr '\n' ' ')"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${pw[@]}" >"$WORK/pip2.log" 2>&1 || { tail -5 "$WORK/pip2.log"; return 1; }
      append_log "pip install (pins)" "$WORK/pip2.log"
    }
    if [ "$PINS" = yes ]; then install_pins && JAX_SIDE="pinned flax/optax/orbax-checkpoint (--pins)"; fi
    if ! "$PY" "${probe[@]}" >"$WORK/probe.log" 2>&1; then
      say "the train step does not import with these packages: $(error_line "$WORK/probe.log")"
      append_log "import probe" "$WORK/probe.log"
      if [ "$PINS" = auto ] && install_pins && "$PY" "${probe[@]}" >"$WORK/probe.log" 2>&1; then
        JAX_SIDE="pinned flax/optax/orbax-checkpoint (the image's did not import)"
      else
        JAX_SIDE="broken: $(error_line "$WORK/probe.log")"
      fi
    fi
  elif ! "$PY" "${probe[@]}" >"$WORK/probe.log" 2>&1; then
    JAX_SIDE="broken: $(error_line "$WORK/probe.log")"
  fi
  say "train-step imports: $JAX_SIDE"

  # --- environment ---------------------------------------------------------------------------------------------
  {
    echo "mode=$MODE budget_s=$BUDGET python=$PY"
    echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "train_step_imports=$JAX_SIDE"
    "$PY" - "$WORK/site" <<'EOF' 2>&1
import importlib.metadata as md, platform, sys
print("python_version=" + platform.python_version())
for n in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "jax", "jaxlib", "jax-cuda13-plugin",
          "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain", "array_record", "portpicker"):
    try:
        d = md.distribution(n)
        carried = str(d.locate_file("")).startswith(sys.argv[1])
        print(f"{n}={d.version}" + (" (carried)" if carried else ""))
    except md.PackageNotFoundError:
        print(f"{n}=absent")
EOF
    if command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu=/'
    else
      echo "gpu=none (no nvidia-smi)"
    fi
  } >"$OUTDIR/env.txt"
  say "$(grep -E '^(python_version|torch|jax|flax|grain|gpu)=' "$OUTDIR/env.txt" | tr '\n' ' ')"

  # --- 1. smoke ------------------------------------------------------------------------------------------------
  SMOKE_RC=skipped
  local t rc t0
  t="$(step_timeout "$SMOKE_CAP")"
  if [ "$t" -gt 0 ]; then
    say "smoke: scripts/gpu_smoke.py ${SMOKE_ARGS[*]} (timeout ${t}s)"
    t0=$SECONDS
    timeout -k 10 "$t" "$PY" -u scripts/gpu_smoke.py "${SMOKE_ARGS[@]}" >"$OUTDIR/smoke.jsonl" 2>"$WORK/smoke.err"
    rc=$?
    SMOKE_RC=$rc
    echo "$rc $((SECONDS - t0)) $t" >"$WORK/smoke.rc"
    append_log "smoke: gpu_smoke.py ${SMOKE_ARGS[*]} (rc $rc)" "$WORK/smoke.err"
    if [ "$rc" = 0 ]; then say "smoke: passed in $((SECONDS - t0)) s"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "smoke: TIMED OUT after ${t}s"
    else say "smoke: FAILED (rc $rc): $(grep '"ok": false' "$OUTDIR/smoke.jsonl" | head -3 | tr '\n' ' ') $( [ -s "$OUTDIR/smoke.jsonl" ] || error_line "$WORK/smoke.err")"
    fi
  else
    say "smoke: skipped, no time left"
  fi

  # --- 2. train step -------------------------------------------------------------------------------------------
  : >"$WORK/attempts.tsv"
  local size impl over status err later
  later=$(echo $SIZES | wc -w)
  for size in $SIZES; do
    later=$((later - 1))
    for impl in $ATTN; do
      over=(); [ "$impl" = default ] || over=("model.attention_impl=$impl")
      if [[ "$JAX_SIDE" == broken* ]]; then
        printf '%s\t%s\t-\t0\tskipped\t%s\n' "$size" "$impl" "train step does not import (${JAX_SIDE#broken: })" >>"$WORK/attempts.tsv"
        break
      fi
      t="$(step_timeout "$BENCH_CAP" $((later * SIZE_RESERVE)))"
      if [ "$t" = 0 ]; then
        printf '%s\t%s\t-\t0\tskipped\tno time left in the %ss budget\n' "$size" "$impl" "$BUDGET" >>"$WORK/attempts.tsv"
        say "bench $size/device, attention $impl and after: skipped, no time left"
        break
      fi
      say "bench $size/device, attention $impl: scripts/bench_gpu_step.py --per-device $size ${BENCH_ARGS[*]}${over[*]:+ ${over[*]}} (timeout ${t}s)"
      rm -f "$WORK/b.json"
      t0=$SECONDS
      timeout -k 10 "$t" "$PY" -u scripts/bench_gpu_step.py --per-device "$size" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} \
        --json-out "$WORK/b.json" ${over[@]+"${over[@]}"} >"$WORK/b.out" 2>"$WORK/b.err"
      rc=$?
      append_log "bench $size/device, attention $impl (rc $rc)" "$WORK/b.err"
      [ -s "$WORK/b.json" ] && cp "$WORK/b.json" "$OUTDIR/bench_$size.json"
      if [ "$rc" = 0 ]; then status=ok; err=""
      elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; err="timed out after ${t}s"
      elif [ -s "$WORK/b.json" ]; then status=fail; err="non-finite losses"
      else status=fail; err="$(error_line "$WORK/b.err")"
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$impl" "$rc" "$((SECONDS - t0))" "$status" "$err" >>"$WORK/attempts.tsv"
      if [ "$status" = ok ]; then say "bench $size/device: passed in $((SECONDS - t0)) s: $(grep '^# ' "$WORK/b.err" | tail -1)"; break; fi
      say "bench $size/device, attention $impl: ${status^^} (rc $rc): $err"
      if grep -qE '^(ModuleNotFoundError|ImportError)' "$WORK/b.err"; then
        say "bench $size/device: an import error; another attention would fail the same"
        break
      fi
    done
  done

  # --- summary -------------------------------------------------------------------------------------------------
  "$PY" - "$OUTDIR" "$WORK" "$MODE" "$BUDGET" "$SECONDS" "$SIZES" "$JAX_SIDE" <<'EOF'
import json, sys
from pathlib import Path

out, work, mode, budget, elapsed, sizes, jax_side = sys.argv[1:8]
out, work = Path(out), Path(work)
env = dict(l.split("=", 1) for l in (out / "env.txt").read_text().splitlines() if "=" in l)
rows = []
if (out / "smoke.jsonl").exists():
    for line in (out / "smoke.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
smoke_rc = (work / "smoke.rc").read_text().split() if (work / "smoke.rc").exists() else None
failed = [r for r in rows if not r.get("ok")]
smoke = {"ran": smoke_rc is not None, "rc": int(smoke_rc[0]) if smoke_rc else None,
         "seconds": int(smoke_rc[1]) if smoke_rc else None, "checks": len(rows), "failed": failed}
smoke["passed"] = smoke["rc"] == 0 and not failed and bool(rows)
envrow = next((r for r in rows if r.get("check") == "environment"), {})
full = next((r for r in rows if r.get("check") == "full_size_decode"), None)
nan_backends = sorted({f"{r['backend']}/{r['dtype'].replace('torch.', '')}" for r in rows
                       if r.get("check") == "sdpa_fully_masked_row" and r.get("nan")})
attempts = []
for line in (work / "attempts.tsv").read_text().splitlines():
    size, impl, rc, secs, status, err = (line.split("\t") + [""] * 6)[:6]
    attempts.append({"per_device": int(size), "attention": impl, "rc": rc, "seconds": int(secs), "status": status,
                     "error": err})
bench = {}
for s in sizes.split():
    tries = [a for a in attempts if a["per_device"] == int(s)]
    ok = next((a for a in tries if a["status"] == "ok"), None)
    res = None
    p = out / f"bench_{s}.json"
    if p.exists():
        res = json.loads(p.read_text())
    bench[s] = {"passed": ok is not None, "attention": ok and ok["attention"], "attempts": tries,
                "result_file": p.name if p.exists() else None}
    if res:  # read defensively: bench_gpu_step.py's report may grow or rename fields
        m, c = res.get("measured", {}), res.get("compiler", {})
        if c.get("step_ms_bound_program"):
            model = (f"roofline bounds {c['step_ms_bound_program']:.1f} ms whole-program, "
                     f"{c.get('step_ms_bound_per_kernel') or 0:.1f} ms per-kernel")
        elif c.get("step_seconds"):
            model = f"compiler step {c['step_seconds'] * 1e3:.1f} ms ({c.get('step_basis', '?')})"
        else:
            model = "no compiler step figure"
        bench[s]["figures"] = {
            "device_kind": res.get("device_kind"), "devices": res.get("devices"), "batch_shape": c.get("batch_shape"),
            "attention_compiled": c.get("attention"), "step_ms": (m.get("step_seconds_median") or 0) * 1e3,
            "mfu": m.get("mfu") or 0.0, "tokens_per_second_per_device": m.get("tokens_per_second") or 0.0,
            "peak_gb": (m.get("peak_bytes_in_use") or 0) / 1e9,
            "compiler_gb": ((c.get("memory_bytes") or {}).get("total") or 0) / 1e9, "compiler_step": model,
            "compile_s": c.get("compile_seconds") or 0, "losses_finite": m.get("all_finite"),
            "ratio": res.get("ratio")}
bench_ok = all(b["passed"] for b in bench.values())
code = 0 if smoke["passed"] and bench_ok else (1 if not smoke["passed"] else 3)
summary = {"mode": mode, "elapsed_s": int(elapsed), "budget_s": int(budget), "env": env,
           "train_step_imports": jax_side, "smoke": smoke, "bench": bench, "exit_status": code,
           "result": "PASS" if code == 0 else "FAIL"}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

unit = "GPU" if mode == "gpu" else "device"
L = ["=" * 32 + " GPU check summary " + "=" * 32]
L.append(f"mode      {mode}, {elapsed} s of a {budget} s budget, python {env.get('python_version')}, commit {env.get('commit')}")
L.append(f"device    {envrow.get('name') or env.get('gpu')}; torch {env.get('torch')}, jax {env.get('jax')}, "
         f"flax {env.get('flax')}, grain {env.get('grain')} (train-step imports: {jax_side})")
if not smoke["ran"]:
    L.append("smoke     FAIL: not run (no time left)")
else:
    head = "PASS" if smoke["passed"] else "FAIL"
    if smoke["rc"] in (124, 137):
        why = f"timed out after {smoke_rc[2]} s, {len(rows)} checks reported"
    else:
        why = f"{len(rows) - len(failed)} of {len(rows)} checks ok in {smoke['seconds']} s"
    L.append(f"smoke     {head}: {why}" + (f"; failed: {', '.join(r['check'] for r in failed)}" if failed else ""))
    for r in failed[:5]:
        L.append(f"            {json.dumps(r)[:200]}")
    if full:
        L.append(f"            full-size decode: {full['batch']} x {full['new_tokens']} tokens, "
                 f"{full['tokens_per_s']:.1f} tokens/s, peak {full['peak_memory_gib'] or 0:.1f} GiB")
    if nan_backends:
        L.append(f"            SDPA NaN on a fully masked row (a fact, not a failure): {', '.join(nan_backends)}")
for s, b in bench.items():
    label = f"bench {s}/{unit}" if s != "0" else "bench cfg"
    f = b.get("figures")
    if b["passed"] and f:
        L.append(f"{label:<9} PASS (attention {b['attention']} -> {f['attention_compiled']}): {f['step_ms']:.1f} ms/step, "
                 f"MFU {f['mfu']:.1%}, {f['tokens_per_second_per_device']:.0f} LLM tokens/s per {unit}; peak "
                 f"{f['peak_gb']:.1f} GB vs compiler {f['compiler_gb']:.1f} GB; {f['compiler_step']}; "
                 f"compile {f['compile_s']:.0f} s; batch {f['batch_shape']}")
    else:
        L.append(f"{label:<9} FAIL")
    for a in b["attempts"]:
        if a["status"] != "ok":
            L.append(f"            attention {a['attention']}: {a['status']}"
                     + (f" (rc {a['rc']}, {a['seconds']} s)" if a["rc"] != "-" else "") + f": {a['error']}")
why = "" if code == 0 else (" (the smoke test failed)" if code == 1 else " (a bench size failed with every attention)")
L.append(f"result    {summary['result']}{why}, exit status {code}")
L.append(f"files     {out}: " + " ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
L.append("=" * 83)
print("\n".join(L))
sys.exit(code)
EOF
}

main 2>&1 | tee "$OUTDIR/gpu_check.log"
rc="${PIPESTATUS[0]}"
# a summary that could not run (the interpreter broke) must not look like a pass
[ -s "$OUTDIR/summary.json" ] || { echo "gpu_check: no summary was written" | tee -a "$OUTDIR/gpu_check.log"; [ "$rc" != 0 ] || rc=1; }
exit "$rc"
