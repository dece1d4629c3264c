"""``osum-train CONFIG --plan``: per-device memory for parameters, optimizer state and activations, without
allocating anything (``nnx.eval_shape`` + the sharding rules over the configured mesh).

Parameters and optimizer state are exact byte counts of each device's shard. Activations are an estimate for
the largest batch shape of the data buckets: with per-layer remat, the saved layer inputs plus one layer's
working set (projections, FFN, float32 attention scores); without remat, every layer's working set. The
float32 logits of the target block and their gradient are included.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec

from ..config import Config
from ..data.pipeline import BucketSpec
from ..models import OSUM
from ..models.layers import as_dtype
from .mesh import AXES, mesh_shape, rules_of
from .trainable import trainable_filter

GiB = 1024 ** 3


def _shard_elems(shape, spec: PartitionSpec, sizes: dict[str, int]) -> int:
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        n *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return n


def plan(cfg: Config, n_devices: int | None = None, device_memory_gb: float = 0.0) -> dict:
    mc, tc = cfg.model, cfg.train
    n_devices = n_devices or jax.device_count()
    sizes = dict(zip(AXES, mesh_shape(tc.mesh, n_devices)))
    model = nnx.eval_shape(lambda: OSUM(mc, rngs=nnx.Rngs(0)))
    flt = trainable_filter(tc.fire_module, mc.lora.rank > 0)
    with nn.logical_axis_rules(rules_of(tc.mesh)):
        train_specs = nnx.get_partition_spec(nnx.state(model, flt))
        all_specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))

    def leaves(specs):
        return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, nnx.Variable))

    train_abs = nnx.state(model, flt)
    all_abs = nnx.state(model, nnx.Param)
    shapes_t = [v.shape for v in leaves(train_abs)]
    specs_t = [v.get_value() for v in leaves(train_specs)]
    shapes_a = [v.shape for v in leaves(all_abs)]
    specs_a = [v.get_value() for v in leaves(all_specs)]
    p_bytes = np.dtype(as_dtype(mc.param_dtype)).itemsize
    f_bytes = np.dtype(as_dtype(tc.frozen_param_dtype)).itemsize
    train_elems = sum(_shard_elems(s, p, sizes) for s, p in zip(shapes_t, specs_t))
    all_elems = sum(_shard_elems(s, p, sizes) for s, p in zip(shapes_a, specs_a))
    params_b = train_elems * p_bytes + (all_elems - train_elems) * f_bytes
    opt_b = train_elems * 4 * (3 if tc.grad_accum > 1 else 2)  # Adam mu, nu (+ accumulated gradient)
    grads_b = train_elems * 4

    # activations for the largest bucket
    spec = BucketSpec.from_config(cfg.data)
    dt = np.dtype(as_dtype(mc.dtype)).itemsize
    dp, tp = sizes["data"] * sizes["fsdp"], sizes["tensor"]
    e, a, l_ = mc.encoder, mc.adapter, mc.llm
    worst = 0.0
    for (frames, tgt), b in spec.batch_sizes.items():
        b_dev = math.ceil(b / dp)
        t1, t3 = math.ceil(frames / 2), math.ceil(frames / 8)
        s = spec.prompt_len + t3 + 2 + tgt
        enc_in = b_dev * t1 * e.d_model * dt
        enc_work = b_dev * t1 * (4 * e.d_model + e.ffn_dim) * dt / tp + b_dev * e.num_heads * t1 * t1 * 4 / tp
        ad_work = b_dev * t3 * (4 * e.d_model + a.ffn_dim) * dt / tp + b_dev * a.num_heads * t3 * t3 * 4 / tp
        hd = l_.resolved_head_dim
        llm_in = b_dev * s * l_.hidden_size * dt
        llm_work = (b_dev * s * ((l_.num_heads + 2 * l_.num_kv_heads) * hd + 3 * l_.intermediate_size) * dt / tp
                    + b_dev * l_.num_heads * s * s * 4 / tp)
        logits = 2 * b_dev * tgt * l_.vocab_size * 4 / tp
        if mc.remat_policy == "none":
            act = e.num_layers * (enc_in + enc_work) + a.num_layers * ad_work + l_.num_layers * (llm_in + llm_work)
        else:
            act = e.num_layers * enc_in + enc_work + a.num_layers * ad_work + l_.num_layers * llm_in + llm_work
        worst = max(worst, act + logits)
    need = params_b + opt_b + grads_b + worst
    out = {
        "devices": n_devices, "mesh": sizes, "fire_module": tc.fire_module,
        "parameters": int(sum(int(np.prod(s)) for s in shapes_a)),
        "trainable": int(sum(int(np.prod(s)) for s in shapes_t)),
        "per_device_GiB": {"parameters": params_b / GiB, "optimizer_state": opt_b / GiB, "gradients": grads_b / GiB,
                           "activations_estimate": worst / GiB, "total": need / GiB},
    }
    if device_memory_gb:
        out["device_memory_GiB"] = device_memory_gb
        out["fits"] = bool(need / GiB <= 0.9 * device_memory_gb)  # keep 10 % for XLA buffers/fragmentation
    return out


def format_plan(p: dict) -> str:
    g = p["per_device_GiB"]
    lines = [
        f"mesh {p['mesh']} on {p['devices']} devices; fire_module {p['fire_module']}",
        f"parameters {p['parameters']:,} (trainable {p['trainable']:,})",
        "per device (GiB):",
    ]
    lines += [f"  {k:22s} {v:10.2f}" for k, v in g.items()]
    if "fits" in p:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"=> {verdict} in {p['device_memory_GiB']:.0f} GiB per device (90 % usable)")
    return "\n".join(lines)
