"""Model FLOPs of a training step, for throughput and MFU reporting.

Counts the matmul and attention-score FLOPs of the forward pass on the padded batch shape (what the device
computes); element-wise work is ignored. A training step then costs, per matmul:

* 1x forward, always;
* +1x for the gradient of its input activation, when anything below it trains (the gradient must flow down);
* +1x for the gradient of its weight, when that weight trains.

So with OSUM's ``link_and_encoder_and_lora`` the encoder and adapter cost 3x, the frozen LLM projections and
the LM head 2x, LoRA and the attention-score products (no weights: both operands get gradients) 3x. This is the
"trainable-aware" count the AOT planner's MFU uses (``osum-train --plan --target``); the compiled programs
execute within a few percent of it (frozen weight gradients are eliminated by XLA). The older 3x-everything
convention (``trainable=None``) overstates a LoRA run by about 1.4x.
"""

from __future__ import annotations

import math

from ..config import ModelConfig


def forward_parts(cfg: ModelConfig, batch: int, frames: int, prompt: int, target: int) -> dict[str, float]:
    """Forward FLOPs by part: ``encoder``, ``adapter``, ``llm_base`` (projections), ``llm_lora``,
    ``llm_scores`` (attention QK^T and PV), ``lm_head``."""
    e, a, l_ = cfg.encoder, cfg.adapter, cfg.llm
    t1 = math.ceil(frames / 2)
    enc = 2 * frames * e.num_mel_bins * e.d_model * 3 + 2 * t1 * e.d_model * e.d_model * 3  # conv front end
    enc += e.num_layers * (2 * t1 * (4 * e.d_model ** 2 + 2 * e.d_model * e.ffn_dim) + 4 * t1 * t1 * e.d_model)
    ad = 0
    t = t1
    for s in a.conv_strides:
        t = math.ceil(t / s)
        ad += 2 * t * e.d_model * e.d_model * a.conv_kernel
    ad += 2 * t * e.d_model * e.d_model  # input projection
    ad += a.num_layers * (2 * t * (4 * e.d_model ** 2 + 2 * e.d_model * a.ffn_dim) + 4 * t * t * e.d_model)
    ad += 2 * t * e.d_model * l_.hidden_size  # projection to the LLM
    seq = prompt + t + 2 + target
    hd, d = l_.resolved_head_dim, l_.hidden_size
    qkvo = d * (l_.num_heads + 2 * l_.num_kv_heads) * hd + l_.num_heads * hd * d
    lora = 0
    if cfg.lora.enabled:
        dims = {"q_proj": (d, l_.num_heads * hd), "k_proj": (d, l_.num_kv_heads * hd),
                "v_proj": (d, l_.num_kv_heads * hd), "o_proj": (l_.num_heads * hd, d),
                "gate_proj": (d, l_.intermediate_size), "up_proj": (d, l_.intermediate_size),
                "down_proj": (l_.intermediate_size, d)}
        lora = sum(cfg.lora.rank_of(name) * (i + o) for name, (i, o) in dims.items())
    return {
        "encoder": float(batch * enc),
        "adapter": float(batch * ad),
        "llm_base": float(batch * l_.num_layers * 2 * seq * (qkvo + 3 * d * l_.intermediate_size)),
        "llm_lora": float(batch * l_.num_layers * 2 * seq * lora),
        "llm_scores": float(batch * l_.num_layers * 4 * seq * seq * l_.num_heads * hd),
        "lm_head": float(batch * 2 * target * d * l_.vocab_size),  # on the target block only
    }


def forward_flops(cfg: ModelConfig, batch: int, frames: int, prompt: int, target: int) -> float:
    return sum(forward_parts(cfg, batch, frames, prompt, target).values())


def train_step_flops(cfg: ModelConfig, batch: int, frames: int, prompt: int, target: int,
                     trainable: str | None = None) -> float:
    """FLOPs of one forward + backward. ``trainable``: the ``train.fire_module`` (trainable-aware count, see the
    module docstring); None: 3x the forward pass (MaxText/PaLM convention, every weight trains)."""
    parts = forward_parts(cfg, batch, frames, prompt, target)
    if trainable is None:
        return 3.0 * sum(parts.values())
    lora_on = cfg.lora.enabled
    enc = trainable in ("encoder", "link_and_encoder", "link_and_encoder_and_lora", "all")
    link = trainable in ("link", "link_and_encoder", "link_and_encoder_and_lora", "all")
    base = trainable == "all" or (trainable == "llm" and not lora_on)
    lora = lora_on and trainable in ("llm", "lora", "link_and_encoder_and_lora", "all")

    def cost(weights_train: bool, below_trains: bool) -> float:
        return 1.0 + float(below_trains) + float(weights_train)

    llm_below = enc or link or lora or base  # a gradient must pass down through the LLM
    return (parts["encoder"] * cost(enc, enc)
            + parts["adapter"] * cost(link, enc or link)
            + parts["llm_base"] * cost(base, llm_below)
            + parts["llm_lora"] * cost(lora, llm_below)
            + parts["llm_scores"] * (3.0 if llm_below else 1.0)
            + parts["lm_head"] * cost(base, llm_below))
