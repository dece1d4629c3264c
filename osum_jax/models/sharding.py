"""Logical sharding constraints on activations (MaxText's ``activation_*`` axes).

Parameters carry logical axis names (``axes.py``) that the trainer maps to mesh axes; activations get the same
treatment here. The model pins the tensors that cross block boundaries to logical names::

    self.ops.constrain(x, ("act_batch", "act_length", "act_embed"))        # [B, T, D] between layers

and the :class:`~osum_jax.models.ops.Ops` the model was built with maps the names to mesh axes with
``train.mesh.activation_rules`` on its mesh (:func:`constrain`). Built without a mesh (tests, inference, the
converter) ``constrain`` is the identity, so the model never depends on one.

Why: with parameters sharded over ``fsdp`` on their ``embed`` dimension and nothing said about activations,
XLA's sharding propagation may choose to follow the weights (activations split on ``embed``, the batch
gathered onto every device), which costs an all-reduce of full-batch activations per layer. Pinning the layer
inputs to the batch sharding makes every layer gather the weights instead (FSDP as intended).

A logical name may appear in several rules: its dimension is split over every listed mesh axis that is larger
than 1 and not already used by an earlier dimension (``act_batch -> data, fsdp``).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")


def logical_spec(names: Sequence[str | None], rules, mesh_shape: dict[str, int]) -> PartitionSpec:
    """``PartitionSpec`` for logical ``names`` under ``rules`` (``[(logical, mesh_axis | None), ...]``)."""
    used: set[str] = set()
    out = []
    for name in names:
        axes = [m for n, m in rules if n == name and m is not None and mesh_shape.get(m, 1) > 1 and m not in used]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None], mesh: jax.sharding.Mesh, rules) -> jax.Array:
    """``with_sharding_constraint(x, spec of names)`` on ``mesh`` under ``rules``."""
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a {x.ndim}-d activation {x.shape}")
    # a dimension that its mesh axes do not divide is left to XLA (e.g. a batch of 1 row on a 4-way mesh)
    fixed = [PartitionSpec.UNCONSTRAINED if axes is _NOT_DIVISIBLE else axes
             for axes in _divisible_axes(names, x.shape, mesh, rules)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fixed)))


def activation_specs(names: Sequence[str], sizes: Sequence[int | tuple[int, ...]], mesh: jax.sharding.Mesh,
                     rules) -> tuple:
    """Mesh axes for each logical name on ``mesh`` under ``rules``, for dimensions of ``sizes``.

    A name whose mesh axes do not divide its size (or every size of a tuple) gets ``None`` (not split), the
    rule :func:`constrain` applies; used to write ``shard_map`` specs for per-device kernels.
    """
    return tuple(None if axes is _NOT_DIVISIBLE else axes for axes in _divisible_axes(names, sizes, mesh, rules))


_NOT_DIVISIBLE = object()


def _divisible_axes(names, sizes, mesh, rules) -> list:
    """Mesh axes of each logical name, or ``_NOT_DIVISIBLE`` where they do not divide its size (or every size
    of a tuple)."""
    out = []
    for axes, size in zip(logical_spec(names, rules, dict(mesh.shape)), sizes):
        n = 1
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            n *= mesh.shape[a]
        ok = all(s % n == 0 for s in (size if isinstance(size, tuple) else (size,)))
        out.append(axes if ok else _NOT_DIVISIBLE)
    return out
