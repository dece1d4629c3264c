"""scripts/bench_gpu_step.py runs the real train step and reports it beside the compiler's figures (CPU here;
a lent GPU runs it at full size: docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from osum_jax.perf.aot import CHIPS, chip_of

ROOT = Path(__file__).resolve().parents[1]


def test_chip_of_names_attached_devices():
    kinds = {"NVIDIA H200": "h200", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-80GB": "a100", "cpu": None,
             "NVIDIA RTX A6000": None}
    for kind, name in kinds.items():
        chip = chip_of(SimpleNamespace(device_kind=kind))
        assert (chip and chip.name) == name, kind
    assert chip_of(SimpleNamespace(device_kind="NVIDIA H200")) is CHIPS["h200"]


@pytest.mark.slow  # compiles and runs the tiny step on 2 simulated CPU devices (~40 s)
@pytest.mark.e2e
def test_bench_gpu_step_runs_the_donated_step_on_local_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "scripts/bench_gpu_step.py", "--config", "configs/tiny.yaml",
                        "--per-device", "0", "--steps", "2", "--warmup", "1", "--json-out", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "r.json").read_text())
    assert out == json.loads(r.stdout.splitlines()[-1])
    c, m = out["compiler"], out["measured"]
    assert out["devices"] == 2 and c["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    # no peak known for a CPU: no step figure, no MFU of any kind, no ratio to one
    assert out["chip"] is None and not {"step_seconds", "mfu", "mfu_bound_program", "mfu_bound_per_kernel"} & set(c)
    assert set(out["ratio"]) == {"step_vs_program_bound", "step_vs_per_kernel_bound", "step_vs_cost_model",
                                 "peak_memory_vs_compiler_total"}
    assert out["ratio"]["step_vs_program_bound"] is None and out["ratio"]["step_vs_per_kernel_bound"] is None
    # the executable that ran is the donated step: trainable + optimizer state come back aliased
    state = c["state_bytes"]
    assert c["memory_bytes"]["aliased"] >= 0.9 * (state["trainable"] + state["optimizer"])  # per device, both
    assert m["steps"] == 2 and len(m["losses"]) == 3 and m["all_finite"]
    assert len(set(m["losses"])) == 3  # the step updates the state (and draws new dropout keys) each time
    assert 0 < m["step_seconds_min"] <= m["step_seconds_median"]
    b = c["batch_shape"]
    assert b["batch"] % 2 == 0 and m["tokens_per_second"] > 0
