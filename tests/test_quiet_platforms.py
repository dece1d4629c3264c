"""Quiet on a host without accelerators (issue 30 item 10): the compile-only plugins of a ``.[dev]`` install (the
jax CUDA plugin, libtpu) print nothing on plain commands, and are still used where the hardware is
(``osum_jax/platforms.py``).

The commands run here without ``JAX_PLATFORMS`` (conftest.py sets it for the test process; a user's shell does
not), and every line they write to stderr must be one of ours.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from osum_jax.platforms import ACCELERATOR_NODES, device_nodes, filtered_stderr, platforms_to_set

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# the lines our commands write to stderr: osum-train's logging format, osum-data's, and our own "osum-...: " lines
OWN = (re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) osum_jax[\w.]*: "),
       re.compile(r"^(INFO|WARNING) osum_jax[\w.]*: "),
       re.compile(r"^osum-(train|data|convert): "))
NOISE = ("cuda", "CUDA", "TPU initialization", "absl", "Traceback", "plugin", "libtpu", "TPU_")

no_accelerator = pytest.mark.skipif(bool(device_nodes()), reason="this host has accelerator device nodes: JAX uses "
                                                                  "the plugins here (and may say so)")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
    env.update(extra)
    return env


def _assert_only_our_lines(stderr: str) -> None:
    foreign = [line for line in stderr.splitlines() if line.strip() and not any(p.match(line) for p in OWN)]
    assert not foreign, "\n".join(foreign[:20])
    assert not [w for w in NOISE if w in stderr], stderr[-3000:]


def test_platforms_decision(tmp_path):
    """cpu on a Linux host without device nodes; nothing where a GPU or TPU node exists, where the user chose
    (even an empty JAX_PLATFORMS), or off Linux (jax-metal on macOS)."""
    dev = tmp_path / "dev"
    dev.mkdir()
    assert platforms_to_set({}, str(dev), "linux") == "cpu"
    assert platforms_to_set({"JAX_PLATFORMS": "cuda"}, str(dev), "linux") is None
    assert platforms_to_set({"JAX_PLATFORMS": ""}, str(dev), "linux") is None
    assert platforms_to_set({"JAX_PLATFORM_NAME": "tpu"}, str(dev), "linux") is None
    assert platforms_to_set({}, str(dev), "darwin") is None
    (dev / "null").touch()
    (dev / "nvidia-caps").mkdir()  # not a GPU node by itself (nvidia[0-9]* and nvidiactl are)
    assert platforms_to_set({}, str(dev), "linux") == "cpu"
    for node in ("nvidia0", "nvidiactl", "dxg", "kfd", "accel0", "vfio"):
        (dev / node).touch()
        assert platforms_to_set({}, str(dev), "linux") is None, node
        assert device_nodes(ACCELERATOR_NODES, str(dev)) == [str(dev / node)]
        (dev / node).unlink()


def test_filtered_stderr_drops_only_the_noise(capfd):
    """What a C library writes to file descriptor 2 is held back and written out without the known lines."""
    with filtered_stderr([re.compile(r"^noise")]):
        os.write(2, b"noise from a plugin\nkept line\nnoise again\n")
        print("python line", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["kept line", "python line"], err  # (pytest holds sys.stderr apart)


@no_accelerator
def test_a_plain_import_leaves_jax_on_cpu_quietly():
    """``import osum_jax`` before JAX (what every console script does first): JAX_PLATFORMS=cpu, the CPU backend,
    not a line on stderr; a user's own JAX_PLATFORMS is kept."""
    code = ("import os, osum_jax, jax; jax.numpy.ones(2).block_until_ready(); "
            "print(os.environ.get('JAX_PLATFORMS'), jax.default_backend())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["cpu", "cpu"], r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]
    for chosen in ("", "cpu,tpu"):  # the user's choice is kept (even empty: JAX chooses, plugins and all)
        r = subprocess.run([sys.executable, "-c", "import os, osum_jax; print(repr(os.environ['JAX_PLATFORMS']))"],
                           cwd=ROOT, env=_env(JAX_PLATFORMS=chosen), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == repr(chosen), (r.stdout, r.stderr[-3000:])


@no_accelerator
@pytest.mark.e2e
def test_cli_help_and_plan_print_nothing_foreign():
    for cmd in (["osum-data", "--help"], ["osum-train", "--help"], ["osum-convert", "--help"],
                ["osum-train", "configs/tiny.yaml", "--plan"]):
        r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        _assert_only_our_lines(r.stderr)
    assert "per device (GiB)" in r.stdout


@no_accelerator
@pytest.mark.e2e
@pytest.mark.slow  # a tiny training run: the espeak corpus, compiling the tiny model (~30 s)
def test_a_tiny_training_run_prints_nothing_foreign(speech_corpus, tmp_path):
    from tests.test_train_run import _overrides

    args = _overrides(speech_corpus, tmp_path / "run", **{"train.steps": 2, "train.checkpoint_every": 2})
    r = subprocess.run([str(BIN / "osum-train"), "configs/tiny.yaml", *args], cwd=ROOT,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "osum-train: stopped at step 2" in r.stderr
    _assert_only_our_lines(r.stderr)


@no_accelerator
def test_the_test_suite_itself_is_quiet():
    """`make test`'s own process (conftest.py imports JAX for the session) prints none of the plugins' lines: the
    CUDA plugin's three `cudart_stub.cc` lines used to close every CI log."""
    # one xdist worker, as `make test` runs them (the workers' import-time lines reach the terminal at the end)
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "1", "-q", "-p", "no:cacheprovider",
                        "tests/test_quiet_platforms.py", "-k", "platforms_decision"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert not [w for w in NOISE if w in r.stderr + r.stdout], (r.stdout[-3000:], r.stderr[-3000:])
