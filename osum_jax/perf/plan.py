"""``osum-train CONFIG --plan``: per-device memory for parameters, optimizer state and activations, without
allocating anything (``nnx.eval_shape`` + the sharding rules over the configured mesh).

Parameters and optimizer state are exact byte counts of each device's shard. Activations are an estimate for
the largest batch shape of the data buckets: with per-layer remat, the saved layer inputs plus one layer's
working set (projections, FFN, float32 attention scores); without remat, every layer's working set. The
float32 logits of the target block and their gradient are included.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec

from ..config import Config
from ..data.pipeline import BucketSpec, packing_report, static_prompt_len
from ..models import OSUM
from ..models.attention import sequence_multiple
from ..models.layers import as_dtype
from ..train.mesh import AXES, frozen_rules_of, mesh_shape, rules_of
from ..train.trainable import trainable_filter

GiB = 1024 ** 3


def _shard_elems(shape, spec: PartitionSpec, sizes: dict[str, int]) -> int:
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        n *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return n


def plan(cfg: Config, n_devices: int | None = None, device_memory_gb: float = 0.0,
         batch_shape: tuple[int, int, int, int] | None = None, platform: str | None = None) -> dict:
    """Per-device memory estimate; ``batch_shape`` ``(B, T, P, L)`` (global) instead of the worst data bucket;
    ``platform`` the devices' (default: JAX's backend), for what ``model.attention_impl=auto`` runs there."""
    mc, tc = cfg.model, cfg.train
    n_devices = n_devices or jax.device_count()
    sizes = dict(zip(AXES, mesh_shape(tc.mesh, n_devices)))
    model = nnx.eval_shape(lambda: OSUM(mc, rngs=nnx.Rngs(0)))
    flt = trainable_filter(tc.fire_module, mc.lora.enabled)
    frozen_flt = nnx.All(nnx.Param, nnx.Not(flt))
    with nn.logical_axis_rules(rules_of(tc.mesh)):
        train_specs = nnx.get_partition_spec(nnx.state(model, flt))
    with nn.logical_axis_rules(frozen_rules_of(tc.mesh)):
        frozen_specs = nnx.get_partition_spec(nnx.state(model, frozen_flt))

    def leaves(specs):
        return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, nnx.Variable))

    train_abs = nnx.state(model, flt)
    frozen_abs = nnx.state(model, frozen_flt)
    shapes_t = [v.shape for v in leaves(train_abs)]
    specs_t = [v.get_value() for v in leaves(train_specs)]
    shapes_f = [v.shape for v in leaves(frozen_abs)]
    specs_f = [v.get_value() for v in leaves(frozen_specs)]
    shapes_a = shapes_t + shapes_f
    p_bytes = np.dtype(as_dtype(mc.param_dtype)).itemsize
    f_bytes = np.dtype(as_dtype(tc.frozen_param_dtype)).itemsize
    train_elems = sum(_shard_elems(s, p, sizes) for s, p in zip(shapes_t, specs_t))
    frozen_elems = sum(_shard_elems(s, p, sizes) for s, p in zip(shapes_f, specs_f))
    params_b = train_elems * p_bytes + frozen_elems * f_bytes
    opt_b = train_elems * 4 * (3 if tc.grad_accum > 1 else 2)  # Adam mu, nu (+ accumulated gradient)
    grads_b = train_elems * 4

    # activations for the largest bucket (the batch the trainer builds: sizes rounded to the data-parallel size)
    dp, tp = sizes["data"] * sizes["fsdp"], sizes["tensor"]
    spec = BucketSpec.from_config(cfg.data, devices=dp, prompt_len=static_prompt_len(cfg.data))
    shapes = {(batch_shape[1], batch_shape[3]): batch_shape[0]} if batch_shape else spec.batch_sizes
    worst = 0.0
    plat = platform or jax.default_backend()

    def multiple(length: int, head_dim: int) -> int:  # a stack's padding on those devices
        return sequence_multiple(mc.attention_impl, as_dtype(mc.dtype), head_dim, length, plat)

    for (frames, tgt), b in shapes.items():
        worst = max(worst, activation_bytes(mc, math.ceil(b / dp), frames, spec.prompt_len, tgt, tp,
                                            seq_multiple=multiple, saved_masks=tc.dropout_rng != "hash"))
    # FSDP gathers each layer's weights before using them: the largest layer, twice (the next one is gathered
    # while the current one computes), or the LM head, when they are sharded
    gathered = _gathered_bytes(mc, tc, sizes)
    need = params_b + opt_b + grads_b + worst + gathered
    out = {
        "devices": n_devices, "mesh": sizes, "fire_module": tc.fire_module,
        "parameters": int(sum(int(np.prod(s)) for s in shapes_a)),
        "trainable": int(sum(int(np.prod(s)) for s in shapes_t)),
        "per_device_GiB": {"parameters": params_b / GiB, "optimizer_state": opt_b / GiB, "gradients": grads_b / GiB,
                           "activations_estimate": worst / GiB,
                           "gathered_weights": gathered / GiB, "total": need / GiB},
    }
    out["batches"] = batches_report(cfg, spec)
    if device_memory_gb:
        out["device_memory_GiB"] = device_memory_gb
        out["fits"] = bool(need / GiB <= 0.9 * device_memory_gb)  # keep 10 % for XLA buffers/fragmentation
    return out


LENGTH_MIX = ("OSUM-like task mix: durations log-uniform on 2-29 s (median 7.6 s), labels 4 tokens per second + 2 "
              "(tag, end of text), every prompt at the static prompt length; 4000 utterances, shuffled")


def length_mix(n: int = 4000, seed: int = 0, prompt: int = 0, max_frames: int = 2900, max_label: int = 200):
    """``(frames, target, prompt)`` of ``n`` utterances drawn from :data:`LENGTH_MIX`."""
    rng = np.random.default_rng(seed)
    seconds = np.exp(rng.uniform(np.log(2.0), np.log(29.0), n))
    frames = np.minimum((seconds * 100).astype(int), max_frames)
    target = np.minimum((seconds * 4).astype(int) + 2, max_label)
    return [(int(f), int(t), prompt) for f, t in zip(frames, target)]


def batches_report(cfg: Config, spec) -> dict:
    """The per-device rows of every bucket (OSUM's rule, padded to static shapes) and what padding costs on
    :data:`LENGTH_MIX` through the pipeline's own batcher."""
    dc = cfg.data
    one = dataclasses.replace(spec, devices=1)  # per device: every device packs its own share alike
    rep = packing_report(one, length_mix(prompt=spec.prompt_len, max_frames=dc.max_frames,
                                         max_label=dc.max_label_tokens))
    return {
        "rule": f"per device: add while longest x (n + 1) <= {dc.max_frames_per_batch} frames and <= "
                f"{dc.max_tokens_per_batch} seq (frames / 8 + label + prompt), at most {dc.max_utts_per_device} "
                "rows",
        "devices": spec.devices, "prompt_len": spec.prompt_len,
        "per_device": [{"frames": f, "target": t, "rows": n, "padded_frames": n * f,
                        "llm_positions": n * (spec.prompt_len + -(-f // 8) + 2 + t)}
                       for (f, t), n in sorted(spec.per_device.items())],
        "length_mix": LENGTH_MIX, "mix": rep["total"],
        "mix_utterances_per_device_batch": rep["total"]["utterances"] / max(rep["total"]["batches"], 1),
    }


def format_batches(b: dict) -> list[str]:
    lines = [f"batches ({b['rule']}; x {b['devices']} data-parallel devices per step; prompt {b['prompt_len']}):",
             "  frames target  rows/device  padded frames  LLM positions"]
    lines += [f"  {r['frames']:6d} {r['target']:6d} {r['rows']:12d} {r['padded_frames']:14d} {r['llm_positions']:14d}"
              for r in b["per_device"]]
    m = b["mix"]
    lines.append(f"padding on the length mix ({b['length_mix']}): {b['mix_utterances_per_device_batch']:.2f} "
                 f"utterances per device batch, frame waste {100 * m['frame_waste']:.1f} %, LLM-position waste "
                 f"{100 * m['token_waste']:.1f} %, rows filled {100 * m['row_fill']:.1f} %")
    return lines


def format_plan(p: dict) -> str:
    g = p["per_device_GiB"]
    lines = [
        f"mesh {p['mesh']} on {p['devices']} devices; fire_module {p['fire_module']}",
        f"parameters {p['parameters']:,} (trainable {p['trainable']:,})",
        "per device (GiB):",
    ]
    lines += [f"  {k:22s} {v:10.2f}" for k, v in g.items()]
    if "batches" in p:
        lines += format_batches(p["batches"])
    if "fits" in p:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"=> {verdict} in {p['device_memory_GiB']:.0f} GiB per device (90 % usable)")
    return "\n".join(lines)


def activation_bytes(mc, b_dev: int, frames: int, prompt: int, target: int, tp: int = 1,
                     seq_multiple=None, saved_masks: bool = True) -> float:
    """Per-device activation memory of a train step for ``b_dev`` utterances of the bucket (frames, target).

    With remat, each layer saves its input, what the policy keeps (``dots_*``: every projection output) and
    its dropout masks (bytes; ``layers.remat_policy`` keeps them, except hash masks: ``saved_masks=False``); one
    layer at a time is recomputed with its full working set (projections, and float32 attention scores and
    probabilities unless a fused kernel runs: ``seq_multiple(length, head_dim) > 1``, each stack's padding, default
    1). Without remat every layer keeps its working
    set. The float32 logits of the target block, their
    softmax and gradient come on top.
    """
    e, a, l_ = mc.encoder, mc.adapter, mc.llm
    dt = np.dtype(as_dtype(mc.dtype)).itemsize
    hd, d, f = l_.resolved_head_dim, l_.hidden_size, l_.intermediate_size
    t1, t3 = math.ceil(frames / 2), math.ceil(frames / 8)
    s = prompt + t3 + 2 + target
    # each stack's padded sequence; the fused attention kernels (the ones that pad to 128-row blocks) never hold
    # [B, H, L, L] scores
    m1, m3, ms = ((seq_multiple or (lambda n, h: 1))(n, h)
                  for n, h in ((t1, e.d_model // e.num_heads), (t3, e.d_model // a.num_heads), (s, hd)))
    t1, t3, s = (-(-n // m) * m for n, m in ((t1, m1), (t3, m3), (s, ms)))
    policy = mc.remat_policy
    dots = policy in ("dots_saveable", "dots_with_no_batch_dims_saveable")

    def layer(tokens, width, ffn, heads, proj_out, drop_masks, lora_masks=0, multiple=1):
        scores = 0 if multiple > 1 else 1
        inp = tokens * width * dt
        saved_dots = tokens * proj_out * dt / tp if dots else 0.0
        if policy == "dots_saveable":
            saved_dots += scores * heads * tokens * tokens * dt / tp
        masks = tokens * (drop_masks + lora_masks) / tp if saved_masks else 0.0
        work = tokens * (proj_out + ffn) * dt / tp + scores * 2 * heads * tokens * tokens * 4 / tp
        return inp, saved_dots + masks, work

    lora_in = 0
    if mc.lora.rank and mc.lora.dropout > 0:
        widths = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": l_.num_heads * hd, "gate_proj": d,
                  "up_proj": d, "down_proj": f}
        lora_in = sum(w for name, w in widths.items() if name in mc.lora.targets)
    parts = [
        (e.num_layers, *layer(t1, e.d_model, e.ffn_dim, e.num_heads, 5 * e.d_model + e.ffn_dim,
                              (2 * e.d_model + e.ffn_dim) if e.dropout > 0 else 0, multiple=m1)),
        (a.num_layers, *layer(t3, e.d_model, a.ffn_dim, a.num_heads, 5 * e.d_model + a.ffn_dim,
                              (2 * e.d_model + a.ffn_dim) if a.dropout > 0 else 0, multiple=m3)),
        (l_.num_layers, *layer(s, d, f, l_.num_heads, (l_.num_heads + 2 * l_.num_kv_heads) * hd + 2 * d + 2 * f,
                               0, lora_in, multiple=ms)),
    ]
    if policy == "none":
        act = sum(n * (inp + extra + work) for n, inp, extra, work in parts)
    else:
        act = sum(n * (inp + extra) for n, inp, extra, _ in parts) + max(work for _, _, _, work in parts)
    logits = 3 * target * l_.vocab_size * 4 / tp
    return float(b_dev * (act + logits))


def _gathered_bytes(mc, tc, sizes: dict[str, int]) -> float:
    """Weights that FSDP all-gathers per step, at their largest moment: two LLM layers (the next is gathered while
    the current one computes) or the LM head, whichever is larger: the head is gathered outside the layer loop,
    so XLA does not keep it live beside the layers' gathers (measured: XLA:GPU at 2 and 28 layers)."""
    l_ = mc.llm
    if sizes["fsdp"] == 1:
        return 0.0
    frozen_fsdp = any(m == "fsdp" for n, m in frozen_rules_of(tc.mesh) if n == "embed")
    if not frozen_fsdp:
        return 0.0
    hd, d, f = l_.resolved_head_dim, l_.hidden_size, l_.intermediate_size
    layer = d * (l_.num_heads + 2 * l_.num_kv_heads) * hd + l_.num_heads * hd * d + 3 * d * f
    fb = np.dtype(as_dtype(tc.frozen_param_dtype)).itemsize
    return float(max(2 * layer, d * l_.vocab_size) * fb / sizes["tensor"])


# -- the same global batch on any pod ---------------------------------------------------------------------------

OSUM_GLOBAL_FRAMES = 24 * 4 * 3900  # OSUM's recipe: 24 GPUs x accum_grad 4 x max_frames_in_batch 3900
HEADROOM = 0.2  # of the device memory left free by a proposal


def recipe_config(cfg: Config, dp: int, accum: int, global_frames: int) -> Config:
    """``cfg`` with per-device budgets and accumulation that give ``global_frames`` frames per optimizer step on
    ``dp`` data-parallel devices: frames ``ceil(global / (dp x accum))``, tokens in the config's tokens-per-frame
    ratio (OSUM: 1900 / 3900) and ``max_utts_per_device`` in the same proportion (so short clips pack as far by
    OSUM's rule as in the base recipe)."""
    dc = cfg.data
    frames = math.ceil(global_frames / (dp * accum))
    scale = frames / dc.max_frames_per_batch
    data = dataclasses.replace(dc, max_frames_per_batch=frames,
                               max_tokens_per_batch=math.ceil(dc.max_tokens_per_batch * scale),
                               max_utts_per_device=max(1, math.ceil(dc.max_utts_per_device * scale)))
    return dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, grad_accum=accum)).validate()


def propose_recipe(cfg: Config, n_devices: int, device_memory_gb: float, global_frames: int,
                   platform: str | None = None, max_accum: int = 16) -> dict:
    """Per-device budget x accumulation candidates that reproduce ``global_frames`` frames per optimizer step on
    ``n_devices``, each with the ``--plan`` memory estimate; the proposal is the fewest accumulation steps (the
    largest per-device batch) that leaves :data:`HEADROOM` of ``device_memory_gb`` free (the TPU cost model's step
    gains from per-chip batch up to about 8 x 29 s utterances: docs/training.md)."""
    sizes = dict(zip(AXES, mesh_shape(cfg.train.mesh, n_devices)))
    dp = sizes["data"] * sizes["fsdp"]
    rows, chosen = [], None
    for accum in range(1, max_accum + 1):
        c = recipe_config(cfg, dp, accum, global_frames)
        p = plan(c, n_devices, platform=platform)
        gib = p["per_device_GiB"]["total"]
        fits = bool(device_memory_gb) and gib * GiB <= (1 - HEADROOM) * device_memory_gb * 1e9
        d = c.data
        rows.append({"grad_accum": accum, "max_frames_per_batch": d.max_frames_per_batch,
                     "max_tokens_per_batch": d.max_tokens_per_batch, "max_utts_per_device": d.max_utts_per_device,
                     "global_frames": d.max_frames_per_batch * dp * accum, "estimate_GiB": gib, "fits": fits,
                     "frame_waste": p["batches"]["mix"]["frame_waste"]})
        if fits and chosen is None:
            chosen = rows[-1]
    out = {"global_frames": global_frames, "devices": n_devices, "data_parallel": dp,
           "device_memory_GB": device_memory_gb, "candidates": rows, "proposal": chosen}
    if chosen is not None:
        out["overrides"] = [f"data.max_frames_per_batch={chosen['max_frames_per_batch']}",
                            f"data.max_tokens_per_batch={chosen['max_tokens_per_batch']}",
                            f"data.max_utts_per_device={chosen['max_utts_per_device']}",
                            f"train.grad_accum={chosen['grad_accum']}"]
    return out


def format_proposal(p: dict, command: str) -> str:
    lines = [f"{p['global_frames']:,} frames per optimizer step on {p['devices']} devices ({p['data_parallel']} "
             f"data-parallel), {p['device_memory_GB']:.0f} GB each, {100 * HEADROOM:.0f} % kept free:",
             "  accum  frames/device  tokens/device  utts/device  --plan GiB  fits  frame waste (length mix)"]
    for r in p["candidates"]:
        mark = " <=" if r is p["proposal"] else ""
        lines.append(f"  {r['grad_accum']:5d} {r['max_frames_per_batch']:14d} {r['max_tokens_per_batch']:14d} "
                     f"{r['max_utts_per_device']:12d} {r['estimate_GiB']:11.2f}  {'yes' if r['fits'] else 'no ':3s}"
                     f"  {100 * r['frame_waste']:5.1f} %{mark}")
    if p["proposal"] is None:
        lines.append("=> no candidate fits: use more devices, or a smaller global batch")
    else:
        lines.append("=> " + command + " " + " ".join(p["overrides"]))
    return "\n".join(lines)
