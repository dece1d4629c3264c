"""scripts/gpu_check.sh (the GPU check in one call) runs its whole sequence in CPU mode, and scripts/gpu_prepare.sh
refuses what it must, offline (docs/benchmarks.md, "Running the GPU check")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bash(*args, timeout=120, **kw):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.slow  # the smoke test's quick mode, then the tiny train step compiled and run (~40-100 s on 2 cores)
@pytest.mark.e2e
def test_cpu_mode_runs_smoke_then_bench_with_the_attention_fallback(tmp_path):
    # cudnn attention cannot run on CPU: the first bench attempt fails and the check falls back to xla
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("OUT", None)
    r = _bash("scripts/gpu_check.sh", "--cpu", "--python", sys.executable, "--out", str(tmp_path),
              "--attn", "cudnn xla", timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    tail = r.stdout[r.stdout.index("GPU check summary"):]
    assert "smoke     PASS" in tail and "bench cfg PASS (attention xla" in tail and "attention cudnn: fail" in tail
    assert "result    PASS, exit status 0" in tail
    assert (tmp_path / "gpu_check.log").read_text() == r.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mode"] == "cpu" and s["result"] == "PASS" and s["exit_status"] == 0
    assert s["smoke"]["passed"] and s["smoke"]["checks"] >= 10 and not s["smoke"]["failed"]
    b = s["bench"]["0"]
    assert b["passed"] and b["attention"] == "xla" and b["result_file"] == "bench_0.json"
    assert [(a["attention"], a["status"]) for a in b["attempts"]] == [("cudnn", "fail"), ("xla", "ok")]
    assert b["figures"]["losses_finite"] and b["figures"]["step_ms"] > 0
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert rows[0]["check"] == "environment" and all(row["ok"] for row in rows)
    bench = json.loads((tmp_path / "bench_0.json").read_text())
    assert bench["compiler"]["attention"] == "xla" and bench["measured"]["all_finite"]
    names = sorted(p.name for p in tmp_path.iterdir())
    # what the device tool brings back from $OUT: at most 8 files, no folders
    assert names == ["bench_0.json", "env.txt", "gpu_check.log", "smoke.jsonl", "steps.log", "summary.json"]


def test_gpu_mode_out_of_time_fails_and_says_so(tmp_path):
    """GPU mode with no wheels and a budget too short for any step: nothing runs, the summary says why, exit 1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = _bash("scripts/gpu_check.sh", "--python", sys.executable, "--wheels", str(tmp_path / "none"),
              "--out", str(tmp_path / "out"), "--budget", "20", env=env)
    assert r.returncode == 1, (r.stdout[-3000:], r.stderr[-2000:])
    assert "no wheels in" in r.stdout and "smoke     FAIL: not run" in r.stdout
    assert "result    FAIL (the smoke test failed), exit status 1" in r.stdout
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["mode"] == "gpu" and not s["smoke"]["ran"] and set(s["bench"]) == {"8", "1"}
    assert all(not b["passed"] and b["attempts"][0]["status"] == "skipped" for b in s["bench"].values())


@pytest.mark.parametrize("args", [["--frobnicate"], ["--sizes", "8 x"], ["--attn", "flash"], ["--budget", "soon"],
                                  ["--out"]])
def test_gpu_check_refuses_bad_arguments(args, tmp_path):
    r = _bash("scripts/gpu_check.sh", *args, "--out", str(tmp_path)) if args != ["--out"] else \
        _bash("scripts/gpu_check.sh", *args)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args,said", [
    (["--bogus"], "unknown argument"),
    (["--python-version", "3"], "--python-version must look like 3.12"),
    (["--limit-mib", "lots"], "--limit-mib must be a whole number"),
    (["--dest"], "--dest needs a folder"),
])
def test_gpu_prepare_refuses_bad_flags_without_downloading(args, said):
    r = _bash("scripts/gpu_prepare.sh", *args)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and said in r.stderr


def test_gpu_prepare_refuses_a_folder_over_the_carry_limit(tmp_path):
    wheels = tmp_path / "wheels"
    (wheels / "missing").mkdir(parents=True)
    (wheels / "missing" / "big-1.0-py3-none-any.whl").write_bytes(b"\0" * (2 * 1024 * 1024))
    r = _bash("scripts/gpu_prepare.sh", "--check-only", "--dest", str(wheels), "--limit-mib", "1")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    assert "over the 1 MiB carry limit" in r.stderr and "2.0 MiB" in r.stderr
    r = _bash("scripts/gpu_prepare.sh", "--check-only", "--dest", str(wheels))  # the real limit, 64 MiB
    assert r.returncode == 0, r.stderr
    assert "1 wheels, 2.0 MiB" in r.stdout and "of 64 MiB travels" in r.stdout
    r = _bash("scripts/gpu_prepare.sh", "--check-only", "--dest", str(tmp_path / "absent"))
    assert r.returncode == 2 and "no folder" in r.stderr


def test_the_wheels_and_outputs_are_ignored_by_git():
    for path in (".gpu_wheels/missing/grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl", "gpu_check_out/summary.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
