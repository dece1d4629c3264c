"""scripts/gpu_smoke.py passes on CPU in its quick mode (the checks a lent GPU runs in full)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_gpu_smoke_quick_on_cpu():
    r = subprocess.run([sys.executable, "scripts/gpu_smoke.py", "--device", "cpu", "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    checks = {row["check"] for row in rows}
    assert {"environment", "sdpa_fully_masked_row", "bf16_load_on_device", "teacher_forced_logits",
            "greedy_batched_single_cpu", "preset_runs"} <= checks
    assert all(row["ok"] for row in rows)
    assert sum(row["check"] == "greedy_batched_single_cpu" for row in rows) == 4  # 2 engines x 2 caches


def test_gpu_smoke_fails_on_a_device_that_is_not_there():
    r = subprocess.run([sys.executable, "scripts/gpu_smoke.py", "--device", "npu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    row = json.loads(r.stdout.splitlines()[0])
    assert r.returncode == 1 and row["check"] == "environment" and not row["ok"] and "torch_npu" in row["error"]
