"""Model FLOPs of a training step, for throughput and MFU reporting.

Counts the matmul and attention-score FLOPs of the forward pass on the padded batch shape (what the device
computes) and multiplies by 3 for forward + backward (activation and weight gradients). Frozen weights need no
weight gradient, so with a LoRA/adapter-only trainable set the true figure is lower (between 2x and 3x the
forward); the 3x convention matches MaxText/PaLM-style MFU reporting. Element-wise work is ignored.
"""

from __future__ import annotations

import math

from ..config import ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, frames: int, prompt: int, target: int) -> float:
    e, a, l_ = cfg.encoder, cfg.adapter, cfg.llm
    t1 = math.ceil(frames / 2)
    f = 2 * frames * e.num_mel_bins * e.d_model * 3 + 2 * t1 * e.d_model * e.d_model * 3  # conv front end
    per_layer = 2 * t1 * (4 * e.d_model ** 2 + 2 * e.d_model * e.ffn_dim) + 4 * t1 * t1 * e.d_model
    f += e.num_layers * per_layer
    t = t1
    for s in a.conv_strides:
        t = math.ceil(t / s)
        f += 2 * t * e.d_model * e.d_model * a.conv_kernel
    f += 2 * t * e.d_model * e.d_model  # input projection
    f += a.num_layers * (2 * t * (4 * e.d_model ** 2 + 2 * e.d_model * a.ffn_dim) + 4 * t * t * e.d_model)
    f += 2 * t * e.d_model * l_.hidden_size  # projection to the LLM
    seq = prompt + t + 2 + target
    hd, d = l_.resolved_head_dim, l_.hidden_size
    qkvo = d * (l_.num_heads + 2 * l_.num_kv_heads) * hd + l_.num_heads * hd * d
    lora = 0
    if cfg.lora.rank:
        dims = {"q_proj": (d, l_.num_heads * hd), "k_proj": (d, l_.num_kv_heads * hd),
                "v_proj": (d, l_.num_kv_heads * hd), "o_proj": (l_.num_heads * hd, d),
                "gate_proj": (d, l_.intermediate_size), "up_proj": (d, l_.intermediate_size),
                "down_proj": (l_.intermediate_size, d)}
        lora = sum(cfg.lora.rank * (i + o) for name, (i, o) in dims.items() if name in cfg.lora.targets)
    llm_layer = 2 * seq * (qkvo + 3 * d * l_.intermediate_size + lora) + 4 * seq * seq * l_.num_heads * hd
    f += l_.num_layers * llm_layer
    f += 2 * target * d * l_.vocab_size  # LM head on the target block only
    return float(batch * f)


def train_step_flops(cfg: ModelConfig, batch: int, frames: int, prompt: int, target: int) -> float:
    return 3.0 * forward_flops(cfg, batch, frames, prompt, target)
