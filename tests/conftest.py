"""Test set-up: 8 simulated CPU devices, float32 everywhere, one torch thread per xdist worker."""

import os

# Must happen before jax is imported anywhere (pytest imports conftest first).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent XLA compilation cache per test session (xdist workers inherit the controller's environment, and
# so do the subprocess runs of osum-train): the tiny model's init / train / eval programs, compiled again and again
# by fresh Trainers and CLI runs, compile once. Executables are the same programs, so results are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _xla_cache = tempfile.mkdtemp(prefix="osum-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    # a size limit turns on JAX's file lock around cache reads/writes (two xdist workers share the directory)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)

# osum_jax first: its platform set-up (osum_jax/platforms.py) loads the compile-only CUDA plugin with its
# "Could not find cuda drivers" lines filtered; a bare `import jax` here printed them at the end of every run
import osum_jax  # noqa: E402,F401
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a dev dependency
    pass


import pytest  # noqa: E402

# -- tools outside the venv: skip without them, or fail closed (OSUM_REQUIRE_TOOLS=1, as .ci/run sets) ----------


def require_tool(available: bool, what: str, install: str) -> None:
    """The one place a missing tool is handled: a skip saying what to install, or, with OSUM_REQUIRE_TOOLS=1 (CI),
    a failure saying the same, so that a CI run without the tool cannot pass by skipping."""
    if available:
        return
    message = f"{what} is not installed: {install}"
    if os.environ.get("OSUM_REQUIRE_TOOLS", "") not in ("", "0"):
        pytest.fail(f"{message} (OSUM_REQUIRE_TOOLS is set: a missing tool is a failure, not a skip)",
                    pytrace=False)
    pytest.skip(message)


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def espeak_ng():
    """espeak-ng, the speech synthesiser of the data tests and the demo (tests using it are marked ``speech``)."""
    from tests.corpus import have_espeak

    require_tool(have_espeak(), "espeak-ng", "apt-get install espeak-ng (.ci/run installs it)")


@pytest.fixture(scope="session")
def tpu_compiler():
    """libtpu, XLA's TPU compiler, for compiling to TPU targets on this host (tests using it are marked
    ``target``)."""
    require_tool(_importable("libtpu"), "libtpu (the TPU compiler)", 'pip install -e ".[tpu-aot]" (in ".[dev]")')


@pytest.fixture(scope="session")
def gpu_compiler():
    """The jax CUDA plugin (XLA:GPU), for compiling to NVIDIA targets on this host (no GPU needed; tests using it
    are marked ``target``)."""
    require_tool(_importable("jax_plugins.xla_cuda12"), "the jax CUDA plugin (XLA:GPU)",
                 'pip install -e ".[gpu-aot]" (in ".[dev]")')


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium and its driver, driven by selenium (the web page's test, marked ``e2e``)."""
    ok = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER) and _importable("selenium")
    require_tool(ok, "chromium + chromium-driver (and selenium)",
                 "apt-get install chromium chromium-driver (.ci/run installs them); selenium is in \".[dev]\"")
    return CHROMIUM, CHROMEDRIVER


# tests that use one of these fixtures get the marker, so that `-m "not speech"` / `-m "not target"` leave them out
_MARK_BY_FIXTURE = {"espeak_ng": "speech", "speech_corpus": "speech", "tpu_compiler": "target",
                    "gpu_compiler": "target", "chromium": "e2e"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker in sorted({m for f, m in _MARK_BY_FIXTURE.items() if f in getattr(item, "fixturenames", ())}):
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)
    # modules holding slow tests first (each module kept whole, so module fixtures are built once): with
    # pytest-xdist the long tests start early instead of leaving one worker busy at the end
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (it.module.__name__ not in slow_modules, order[id(it)]))


@pytest.fixture(scope="session")
def speech_corpus(espeak_ng, tmp_path_factory):
    """Real speech (espeak-ng) + data.list + tiny tokenizer; skipped with the reason if espeak-ng is missing
    (a failure under OSUM_REQUIRE_TOOLS=1)."""
    from tests.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("speech"))
