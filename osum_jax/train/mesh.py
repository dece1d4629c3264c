"""Device mesh ``(data, fsdp, tensor)``, logical-axis rules, and placing model state and batches on it."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from osum_torch_infer.contract import BATCH_KEYS, IGNORE_ID, PAD_PROMPT

from ..config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` over ``n_devices``; with ``dcn_data`` slices the sizes given are per slice (ICI)
    and the data axis is ``dcn_data`` times the per-slice one (MaxText's ``dcn_data_parallelism``)."""
    slices = max(1, cfg.dcn_data)
    if n_devices % slices:
        raise ConfigError(f"train.mesh.dcn_data={slices}: {n_devices} devices are not divisible into {slices} slices")
    per = n_devices // slices
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per % fixed:
            raise ConfigError(f"train.mesh {dict(zip(AXES, sizes))}: {per} devices"
                              f"{' per slice' if slices > 1 else ''} are not divisible by {fixed}")
        sizes[sizes.index(-1)] = per // fixed
    if math.prod(sizes) != per:
        raise ConfigError(f"train.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices"
                          f"{' per slice' if slices > 1 else ''}; {per} are available")
    return (sizes[0] * slices, sizes[1], sizes[2])


def build_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh over ``devices`` (default: all) with Auto axis types (Explicit breaks nnx.Linear under sharding).

    ``train.mesh.dcn_data > 1``: the devices form that many slices (their ``slice_index``; devices without
    distinct slice indices, e.g. simulated CPU devices, are taken as contiguous blocks) and the data axis runs
    across them, slice-major, so only the data-parallel gradient reduction crosses the data-centre network
    while fsdp and tensor stay on each slice's ICI."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    axis_types = (AxisType.Auto,) * 3
    slices = max(1, cfg.dcn_data)
    if slices == 1:
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    ici = (shape[0] // slices, shape[1], shape[2])
    if len({getattr(d, "slice_index", 0) for d in devices}) == slices:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    else:  # no slice indices to go by: contiguous blocks of devices are the slices
        per = len(devices) // slices
        grid = np.concatenate([np.asarray(devices[i * per:(i + 1) * per], dtype=object).reshape(ici)
                               for i in range(slices)], axis=0)
    return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)


def rules_of(cfg: MeshConfig) -> tuple[tuple[str, str | None], ...]:
    return tuple((a, b) for a, b in cfg.rules)


def frozen_rules_of(cfg: MeshConfig) -> tuple[tuple[str, str | None], ...]:
    """The rules for frozen parameters: ``frozen_rules`` entries override ``rules`` for the names they list
    (a name listed there uses only its entries there); every other name follows ``rules``."""
    own = tuple((a, b) for a, b in cfg.frozen_rules)
    named = {a for a, _ in own}
    return own + tuple((a, b) for a, b in cfg.rules if a not in named)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules) -> Any:
    """NamedShardings for an ``nnx.State`` from its logical axis names and the rules table."""
    with nn.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
                        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh, rules) -> None:
    """Move every variable of ``module`` onto ``mesh`` according to its logical axes (in place)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def align_across_processes(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Multi-host SPMD needs one shape per step: pad every process's batch to the largest (B, T, P, L) seen.

    Padding rows have one silent frame and no prompt/target (no loss). With one process this is a no-op.
    """
    batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
    if jax.process_count() == 1:
        return batch
    dims = np.array([batch["feats"].shape[0], batch["feats"].shape[1], batch["prompt"].shape[1],
                     batch["target"].shape[1]], np.int64)
    b, t, p, l_ = from_every_process(dims).max(axis=0)
    return pad_batch(batch, int(b), int(t), int(p), int(l_))


def empty_batch(mel_bins: int) -> dict[str, np.ndarray]:
    """A batch of no rows (the data pipeline's dtypes): what a process whose data ran out contributes to a
    multi-host step that others still have data for; ``align_across_processes`` pads it to padding rows."""
    z = np.zeros((0,), np.int32)
    return {"feats": np.zeros((0, 0, mel_bins), np.float32), "feats_lengths": z, "prompt": np.zeros((0, 0), np.int32),
            "prompt_lengths": z, "target": np.zeros((0, 0), np.int32), "target_lengths": z, "num_real": np.int32(0)}


def from_every_process(local: np.ndarray) -> np.ndarray:
    """``[processes, n]``: every process's 1-D ``local`` (a tiny all-gather; with one process just ours)."""
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def process_flags(*flags: bool) -> np.ndarray:
    """``[processes, len(flags)]`` booleans: every process's ``flags``. Multi-host SPMD must agree on control
    flow: when the data ends, when to stop, when to evaluate."""
    return from_every_process(np.asarray(flags, np.int32)).astype(bool)


def process_sum(values) -> np.ndarray:
    """Element-wise sum of ``values`` (float64) over all processes."""
    return from_every_process(np.asarray(values, np.float64)).sum(axis=0)


def global_to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array on every process (rows of all processes, in global order)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_rows(x: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """This process's rows ``[b, ...]`` -> a global array sharded over ``data x fsdp`` like a batch."""
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)


def pad_batch(batch: Mapping[str, np.ndarray], b: int, t: int, p: int, l_: int) -> dict[str, np.ndarray]:
    out = {}
    f = batch["feats"]
    out["feats"] = np.zeros((b, t, f.shape[2]), f.dtype)
    out["feats"][: f.shape[0], : f.shape[1]] = f
    out["feats_lengths"] = np.ones(b, batch["feats_lengths"].dtype)
    out["feats_lengths"][: f.shape[0]] = batch["feats_lengths"]
    for key, width, pad in (("prompt", p, PAD_PROMPT), ("target", l_, IGNORE_ID)):
        x = batch[key]
        out[key] = np.full((b, width), pad, x.dtype)
        out[key][: x.shape[0], : x.shape[1]] = x
        out[key + "_lengths"] = np.zeros(b, batch[key + "_lengths"].dtype)
        out[key + "_lengths"][: x.shape[0]] = batch[key + "_lengths"]
    return out


def put_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded over ``data x fsdp``."""
    out = {}
    for k in BATCH_KEYS:
        if k not in batch:
            continue
        out[k] = put_rows(batch[k], mesh)
    return out
