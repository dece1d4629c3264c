"""Flat, dotted-path access to an NNX module's variables, and strict loading of arrays into them."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointMismatch(ValueError):
    """Keys or shapes of a checkpoint do not match the model (message lists the offending keys)."""


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_variables(module: nnx.Module, kind: type = nnx.Variable) -> dict[str, nnx.Variable]:
    """``{"encoder.layers.fc1.kernel": Variable, ...}`` for every variable of type ``kind`` in ``module``."""
    return {path_str(p): v for p, v in nnx.iter_graph(module) if isinstance(v, kind)}


def load_flat(module: nnx.Module, arrays: Mapping[str, np.ndarray], *, strict: bool = True,
              source: str = "checkpoint") -> None:
    """Assign ``arrays`` (dotted path -> array) to ``module``'s variables, checking names and shapes.

    With ``strict`` every variable must be provided. Unknown names and shape mismatches always raise
    :class:`CheckpointMismatch`, listing all problems at once; nothing is assigned unless all checks pass.
    Arrays are cast to each variable's dtype.
    """
    targets = flat_variables(module)
    problems = []
    unknown = sorted(set(arrays) - set(targets))
    if unknown:
        problems.append(f"unexpected keys: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
    missing = sorted(set(targets) - set(arrays))
    if strict and missing:
        problems.append(f"missing keys: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    for name, arr in arrays.items():
        if name in targets and tuple(arr.shape) != tuple(targets[name].shape):
            problems.append(f"{name}: {source} shape {tuple(arr.shape)} != model shape {tuple(targets[name].shape)}")
    if problems:
        raise CheckpointMismatch(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    for name, arr in arrays.items():
        var = targets[name]
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
