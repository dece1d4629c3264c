"""The serving host's install (`pip install ".[torch]"`) brings no JAX: the dependency closure of the base package
plus its `torch` extra, walked through the installed distributions' own metadata, has none of the JAX stack."""

import importlib.metadata as md
import re

from packaging.requirements import Requirement

JAX_STACK = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "libtpu", "chex", "tensorstore"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(dist: str, extras: set[str]) -> dict[str, str]:
    """``{distribution: who required it}`` reachable from ``dist[extras]`` (markers evaluated for this Python)."""
    seen: dict[str, str] = {}
    todo = [(dist, frozenset(extras), "<root>")]
    while todo:
        name, ex, parent = todo.pop()
        key = _norm(name)
        if key in seen and not ex:
            continue
        seen.setdefault(key, parent)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # an optional dependency not installed here: nothing below it to walk
        for line in reqs:
            r = Requirement(line)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if r.marker is not None and not any(r.marker.evaluate(env) for env in envs):
                continue
            if _norm(r.name) in seen and not r.extras:
                continue
            todo.append((r.name, frozenset(r.extras), key))
    return seen


def test_torch_extra_brings_no_jax():
    got = closure("osum-jax", {"torch"})
    assert {"torch", "transformers", "soundfile", "numpy"} <= set(got), sorted(got)
    leaked = {k: v for k, v in got.items() if k in JAX_STACK}
    assert not leaked, f"installing .[torch] would pull in {leaked} (package: required by)"


def test_train_extra_brings_jax():  # the walk itself can see JAX when it is there
    got = closure("osum-jax", {"train"})
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= set(got)
    assert "torch" not in got


def test_serving_extras_bring_no_jax():  # a GPU/NPU serving host: torch runtime, HTTP server, Ray Serve replicas
    got = closure("osum-jax", {"torch", "serve", "ray"})
    assert {"fastapi", "uvicorn", "ray"} <= set(got), sorted(got)
    leaked = {k: v for k, v in got.items() if k in JAX_STACK}
    assert not leaked, f"installing .[torch,serve,ray] would pull in {leaked} (package: required by)"
