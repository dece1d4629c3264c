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

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a dev dependency
    pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory):
    """Real speech (espeak-ng) + data.list + tiny tokenizer; skipped with the reason if espeak-ng is missing."""
    from tests.corpus import build_corpus, have_espeak

    if not have_espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); .ci/run installs it")
    return build_corpus(tmp_path_factory.mktemp("speech"))
