"""JAX's platforms for this process, decided before JAX is imported; the compile-only plugins kept quiet.

A ``.[dev]`` install carries the jax CUDA plugin and libtpu so that ``osum-train --plan --target`` can compile
for GPUs and TPUs on any host. On a host without that hardware, left to themselves, they print on every command:

* at ``import jax`` the CUDA plugin's extension modules log ``cudart_stub.cc ... Could not find cuda drivers``
  (absl, from C++, three times), even for ``osum-data --help``;
* at the first backend start JAX initialises every plugin it finds: the CUDA plugin fails its version check
  (``ERROR ... Jax plugin configuration error`` with a traceback, ``Unable to load CUDA``) and libtpu logs its
  host-bounds warnings and ``TPU initialization failed``.

:func:`configure` runs from ``osum_jax/__init__.py``, before any module of the package imports JAX:

* ``JAX_PLATFORMS=cpu`` when this Linux host has no accelerator device nodes (``/dev/nvidia*``, ``/dev/dxg``,
  ``/dev/kfd``, ``/dev/accel*``, ``/dev/vfio``): JAX then starts only its CPU backend; libtpu is not started,
  and the CUDA plugin registers itself without its CUDA check (it skips it for a platform list without CUDA).
  A ``JAX_PLATFORMS`` the user set (even empty) always wins, and on a host with an accelerator nothing is
  changed: the plugins are used. Compiling for a target (``--plan --target``) needs no backend of that kind:
  the target's compiler is started there, on request (``perf/aot.py``, its start-up lines filtered too);
* without an NVIDIA device, the CUDA plugin's extension modules load, and the plugin registers itself (JAX
  calls its ``initialize()`` at the first backend start, which loads its library), with their known lines
  filtered out of stderr (:func:`filtered_stderr`; anything else they print still shows).

It imports nothing heavy (no JAX) and does nothing when JAX is already imported: whoever imported it chose.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping

# device nodes of the accelerators JAX has plugins for: NVIDIA (WSL2: /dev/dxg), AMD ROCm, Cloud TPU (v4/v5e
# /dev/accel*, v5p/v6e through VFIO)
NVIDIA_NODES = ("nvidia[0-9]*", "nvidiactl", "dxg")
ACCELERATOR_NODES = NVIDIA_NODES + ("kfd", "accel[0-9]*", "vfio")

# what the CUDA plugin's extension modules print on loading where there is no driver
CUDA_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"),
    re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.\s*$"),
)
# what libtpu prints when it starts on a host that is not a TPU VM, for compiling only (--plan --target tpu:...)
TPU_NOISE = (
    re.compile(r"could not determine TPU (accelerator type|worker hostnames)"),
    re.compile(r"^WARNING: Logging before InitGoogle\(\) is written to STDERR\s*$"),
    re.compile(r"^=== Source Location Trace: ===\s*$"),
    re.compile(r"^[\w./-]+\.cc:\d+\s*$"),  # the trace's source locations
)
_CUDA_PLUGIN_PACKAGES = ("jax_cuda12_plugin.", "jax_cuda13_plugin.", "jax_plugins.xla_cuda12.",
                         "jax_plugins.xla_cuda13.")
_CUDA_PJRT_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")  # their initialize() loads the library


def device_nodes(patterns: Iterable[str] = ACCELERATOR_NODES, dev: str = "/dev") -> list[str]:
    """The accelerator device nodes present under ``dev``."""
    return sorted({p for pattern in patterns for p in glob.glob(os.path.join(dev, pattern))})


def platforms_to_set(environ: MutableMapping[str, str] = os.environ, dev: str = "/dev",
                     system: str = sys.platform) -> str | None:
    """The ``JAX_PLATFORMS`` value to set for this process, or None to leave JAX to choose: ``"cpu"`` on a Linux
    host without accelerator device nodes, unless the user set ``JAX_PLATFORMS`` (or the older
    ``JAX_PLATFORM_NAME``) already. Other systems (e.g. macOS with jax-metal) are left alone."""
    if "JAX_PLATFORMS" in environ or "JAX_PLATFORM_NAME" in environ or not system.startswith("linux"):
        return None
    return None if device_nodes(ACCELERATOR_NODES, dev) else "cpu"


def configure(environ: MutableMapping[str, str] = os.environ, dev: str = "/dev") -> None:
    """Decide JAX's platforms and quiet the compile-only plugins (module docstring). Call before importing JAX."""
    if "jax" in sys.modules:
        return
    value = platforms_to_set(environ, dev)
    if value is not None:
        environ["JAX_PLATFORMS"] = value
    if sys.platform.startswith("linux") and not device_nodes(NVIDIA_NODES, dev):
        quiet_cuda_plugin()


@contextlib.contextmanager
def filtered_stderr(noise: Iterable[re.Pattern]) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (C++ logging included) while the block runs, then write
    it out without the lines that match ``noise``. Only for short, single-threaded stretches (module loading,
    a compiler's start-up): output of other threads in that time is delayed, not lost."""
    noise = tuple(noise)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(p.search(line) for p in noise))
            if kept:
                os.write(2, kept.encode("utf-8"))


class _QuietLoader(importlib.abc.Loader):
    """An extension module's loader that loads it under :func:`filtered_stderr`."""

    def __init__(self, inner, noise):
        self._inner, self._noise = inner, noise

    def create_module(self, spec):
        with filtered_stderr(self._noise):
            return self._inner.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr(self._noise):
            self._inner.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _QuietInitLoader(importlib.abc.Loader):
    """The PJRT plugin package's loader: as usual, then its ``initialize()`` runs under :func:`filtered_stderr`."""

    def __init__(self, inner, noise):
        self._inner, self._noise = inner, noise

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        init = getattr(module, "initialize", None)
        if callable(init):
            noise = self._noise

            @functools.wraps(init)
            def initialize(*args, **kwargs):
                with filtered_stderr(noise):
                    return init(*args, **kwargs)

            module.initialize = initialize

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _QuietCudaPlugin(importlib.abc.MetaPathFinder):
    """Finds the CUDA plugin's modules as usual; loads its extension modules and runs its ``initialize()``
    quietly."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_CUDA_PLUGIN_PACKAGES) and fullname not in _CUDA_PJRT_PLUGINS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None  # the usual finders take it
        if fullname in _CUDA_PJRT_PLUGINS:
            spec.loader = _QuietInitLoader(spec.loader, CUDA_NOISE)
        elif isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            spec.loader = _QuietLoader(spec.loader, CUDA_NOISE)
        else:
            return None
        return spec


def quiet_cuda_plugin() -> None:
    """Load the jax CUDA plugin's extension modules without their no-driver lines (idempotent)."""
    if not any(isinstance(f, _QuietCudaPlugin) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietCudaPlugin())
