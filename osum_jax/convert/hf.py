"""Name tables between Hugging Face torch checkpoints and the JAX modules.

* Whisper (``WhisperEncoder`` / ``WhisperModel`` / ``WhisperForConditionalGeneration``): encoder only.
* Qwen2 (``Qwen2ForCausalLM``), optionally wrapped by peft (``base_model.model.`` prefix, ``base_layer``,
  ``lora_A.default`` / ``lora_B.default``) or saved with the plain pre-0.7 peft names.

Torch linear weights are ``[out, in]`` and become ``[in, out]`` kernels; torch Conv1d weights ``[out, in, k]``
become ``[k, in, out]``; per-layer tensors are stacked on the leading ``layers`` axis of the scanned modules.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from ..config import LLMConfig, LoRAConfig
from ..checkpoint.tree import CheckpointMismatch

Transform = Callable[[np.ndarray], np.ndarray]


def _id(x: np.ndarray) -> np.ndarray:
    return x


def _linear(x: np.ndarray) -> np.ndarray:  # torch [out, in] -> [in, out]
    return np.ascontiguousarray(x.T)


def _conv(x: np.ndarray) -> np.ndarray:  # torch [out, in, k] -> [k, in, out]
    return np.ascontiguousarray(np.transpose(x, (2, 1, 0)))


# (jax path relative to the module, torch key relative to the module's prefix, transform)
WHISPER_TOP = [
    ("conv1.kernel", "conv1.weight", _conv),
    ("conv1.bias", "conv1.bias", _id),
    ("conv2.kernel", "conv2.weight", _conv),
    ("conv2.bias", "conv2.bias", _id),
    ("embed_positions", "embed_positions.weight", _id),
    ("layer_norm.scale", "layer_norm.weight", _id),
    ("layer_norm.bias", "layer_norm.bias", _id),
]
WHISPER_LAYER = [
    ("self_attn_layer_norm.scale", "self_attn_layer_norm.weight", _id),
    ("self_attn_layer_norm.bias", "self_attn_layer_norm.bias", _id),
    ("self_attn.q_proj.kernel", "self_attn.q_proj.weight", _linear),
    ("self_attn.q_proj.bias", "self_attn.q_proj.bias", _id),
    ("self_attn.k_proj.kernel", "self_attn.k_proj.weight", _linear),
    ("self_attn.v_proj.kernel", "self_attn.v_proj.weight", _linear),
    ("self_attn.v_proj.bias", "self_attn.v_proj.bias", _id),
    ("self_attn.out_proj.kernel", "self_attn.out_proj.weight", _linear),
    ("self_attn.out_proj.bias", "self_attn.out_proj.bias", _id),
    ("final_layer_norm.scale", "final_layer_norm.weight", _id),
    ("final_layer_norm.bias", "final_layer_norm.bias", _id),
    ("fc1.kernel", "fc1.weight", _linear),
    ("fc1.bias", "fc1.bias", _id),
    ("fc2.kernel", "fc2.weight", _linear),
    ("fc2.bias", "fc2.bias", _id),
]

QWEN2_TOP = [
    ("embed_tokens", "model.embed_tokens.weight", _id),
    ("norm.scale", "model.norm.weight", _id),
    ("lm_head", "lm_head.weight", _linear),
]
QWEN2_PROJ = {  # module path -> has bias
    "self_attn.q_proj": True, "self_attn.k_proj": True, "self_attn.v_proj": True, "self_attn.o_proj": False,
    "mlp.gate_proj": False, "mlp.up_proj": False, "mlp.down_proj": False,
}


def qwen2_layer_table(cfg: LLMConfig, lora: LoRAConfig | None) -> list[tuple[str, str, Transform]]:
    rows = [
        ("input_layernorm.scale", "input_layernorm.weight", _id),
        ("post_attention_layernorm.scale", "post_attention_layernorm.weight", _id),
    ]
    for mod, has_bias in QWEN2_PROJ.items():
        rows.append((f"{mod}.kernel", f"{mod}.weight", _linear))
        if has_bias and cfg.attention_bias:
            rows.append((f"{mod}.bias", f"{mod}.bias", _id))
        if lora is not None and lora.rank > 0 and mod.split(".")[-1] in lora.targets:
            rows.append((f"{mod}.lora_a", f"{mod}.lora_A.weight", _linear))
            rows.append((f"{mod}.lora_b", f"{mod}.lora_B.weight", _linear))
    return rows


_PEFT_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def normalize_peft_key(key: str) -> str:
    """peft names -> plain HF names: strip ``base_model.model.``, ``.base_layer``, the adapter name."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    key = key.replace(".base_layer.", ".")
    return _PEFT_ADAPTER.sub(r".\1.weight", key)


def map_stacked(state: Mapping[str, np.ndarray], top: list, layer: list, num_layers: int, layer_prefix: str,
                prefix: str = "", *, source: str = "checkpoint", ignore: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Apply a name table: returns ``{jax path: array}`` with per-layer tensors stacked on axis 0.

    Every key of ``state`` under ``prefix`` must be consumed (or match an ``ignore`` regex); every table entry
    must be present. Otherwise raises :class:`CheckpointMismatch` listing the keys.
    """
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def take(key: str, fn: Transform):
        if key not in state:
            missing.append(key)
            return None
        used.add(key)
        return fn(np.asarray(state[key]))

    for jax_name, torch_name, fn in top:
        arr = take(prefix + torch_name, fn)
        if arr is not None:
            out[jax_name] = arr
    for jax_name, torch_name, fn in layer:
        per_layer = [take(f"{prefix}{layer_prefix}{i}.{torch_name}", fn) for i in range(num_layers)]
        if all(a is not None for a in per_layer):
            shapes = {a.shape for a in per_layer}
            if len(shapes) != 1:
                raise CheckpointMismatch(f"{source}: {layer_prefix}*.{torch_name} has different shapes per layer "
                                         f"{sorted(shapes)}")
            out[f"layers.{jax_name}"] = np.stack(per_layer)
    unexpected = sorted(k for k in state if k.startswith(prefix) and k not in used
                        and not any(re.fullmatch(p, k) for p in ignore))
    if missing or unexpected:
        raise CheckpointMismatch(
            f"{source}: {len(missing)} missing key(s) {missing[:10]}; {len(unexpected)} unexpected key(s) "
            f"{unexpected[:10]}")
    return out


def whisper_encoder_from_hf(state: Mapping[str, np.ndarray], num_layers: int, *, prefix: str | None = None,
                            source: str = "Whisper checkpoint") -> dict[str, np.ndarray]:
    """HF Whisper state dict -> ``WhisperEncoder`` arrays. Decoder/projection keys are ignored.

    ``prefix`` defaults to ``model.encoder.`` when such keys exist, else ``""`` (a bare ``WhisperEncoder``).
    """
    if prefix is None:
        prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in state) else ""
    enc_state = {k: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
    return map_stacked(enc_state, WHISPER_TOP, WHISPER_LAYER, num_layers, "layers.", prefix, source=source)


def qwen2_from_hf(state: Mapping[str, np.ndarray], cfg: LLMConfig, lora: LoRAConfig | None = None, *,
                  source: str = "Qwen2 checkpoint") -> dict[str, np.ndarray]:
    """HF ``Qwen2ForCausalLM`` (optionally peft-wrapped) state dict -> ``Qwen2`` arrays.

    With ``lora`` given, LoRA A/B tensors are required for its targets; without, LoRA keys are an error.
    Rotary ``inv_freq`` buffers are ignored. A tied model has no ``lm_head.weight``.
    """
    norm = {normalize_peft_key(k): v for k, v in state.items()}
    top = [row for row in QWEN2_TOP if not (cfg.tie_word_embeddings and row[0] == "lm_head")]
    ignore = (r".*rotary_emb\.inv_freq",)
    if cfg.tie_word_embeddings:
        ignore += (r"lm_head\.weight",)
    return map_stacked(norm, top, qwen2_layer_table(cfg, lora), cfg.num_layers, "model.layers.", "",
                       source=source, ignore=ignore)
