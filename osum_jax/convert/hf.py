"""Rule tables between Hugging Face torch checkpoints and the JAX modules, and the key matching that
``osum-convert import-hf`` and the parity tests share.

* Whisper (``WhisperEncoder`` / ``WhisperModel`` / ``WhisperForConditionalGeneration``): encoder only.
* Qwen2 (``Qwen2ForCausalLM``), optionally wrapped by peft (``base_model.model.`` prefix, ``base_layer``,
  ``lora_A.default`` / ``lora_B.default``) or saved with the plain pre-0.7 peft names.

The tables are :data:`WHISPER` and :data:`QWEN2`, literal rows (:mod:`.rules`): torch linear weights ``[out, in]``
become ``[in, out]`` kernels, torch Conv1d weights ``[out, in, k]`` become ``[k, in, out]``, per-layer tensors are
stacked on the leading ``layers`` axis of the scanned modules. :func:`match_whisper` / :func:`match_qwen2` pair
a checkpoint's keys with a table; :func:`whisper_encoder_from_hf` / :func:`qwen2_from_hf` apply that match to an
in-memory state dict.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import numpy as np

from ..checkpoint.tree import CheckpointMismatch
from ..config import LLMConfig, LoRAConfig
from .rules import CONV, IDENTITY, LINEAR, Entry, Rule, assemble, encoder_flags, expand, group, llm_flags, select

# HF ``WhisperEncoder``: (JAX path in ``WhisperEncoder``, HF key, transform[, when]); layer rows are ``layers.{i}``
WHISPER = [
    Rule("conv1.kernel",                      "conv1.weight",                           CONV),
    Rule("conv1.bias",                        "conv1.bias",                             IDENTITY),
    Rule("conv2.kernel",                      "conv2.weight",                           CONV),
    Rule("conv2.bias",                        "conv2.bias",                             IDENTITY),
    Rule("embed_positions",                   "embed_positions.weight",                 IDENTITY),
    Rule("layer_norm.scale",                  "layer_norm.weight",                      IDENTITY),
    Rule("layer_norm.bias",                   "layer_norm.bias",                        IDENTITY),
    Rule("layers.self_attn_layer_norm.scale", "layers.{i}.self_attn_layer_norm.weight", IDENTITY),
    Rule("layers.self_attn_layer_norm.bias",  "layers.{i}.self_attn_layer_norm.bias",   IDENTITY),
    Rule("layers.self_attn.q_proj.kernel",    "layers.{i}.self_attn.q_proj.weight",     LINEAR),
    Rule("layers.self_attn.q_proj.bias",      "layers.{i}.self_attn.q_proj.bias",       IDENTITY),
    Rule("layers.self_attn.k_proj.kernel",    "layers.{i}.self_attn.k_proj.weight",     LINEAR),
    Rule("layers.self_attn.v_proj.kernel",    "layers.{i}.self_attn.v_proj.weight",     LINEAR),
    Rule("layers.self_attn.v_proj.bias",      "layers.{i}.self_attn.v_proj.bias",       IDENTITY),
    Rule("layers.self_attn.out_proj.kernel",  "layers.{i}.self_attn.out_proj.weight",   LINEAR),
    Rule("layers.self_attn.out_proj.bias",    "layers.{i}.self_attn.out_proj.bias",     IDENTITY),
    Rule("layers.final_layer_norm.scale",     "layers.{i}.final_layer_norm.weight",     IDENTITY),
    Rule("layers.final_layer_norm.bias",      "layers.{i}.final_layer_norm.bias",       IDENTITY),
    Rule("layers.fc1.kernel",                 "layers.{i}.fc1.weight",                  LINEAR),
    Rule("layers.fc1.bias",                   "layers.{i}.fc1.bias",                    IDENTITY),
    Rule("layers.fc2.kernel",                 "layers.{i}.fc2.weight",                  LINEAR),
    Rule("layers.fc2.bias",                   "layers.{i}.fc2.bias",                    IDENTITY),
    Rule("layers.self_attn.k_proj.bias",      "layers.{i}.self_attn.k_proj.bias",       IDENTITY, "key_bias"),
]

# HF ``Qwen2ForCausalLM`` (plain HF names, peft's reduced by :func:`normalize_peft_key`): (JAX path in ``Qwen2``,
# HF key, transform[, when])
QWEN2 = [
    Rule("embed_tokens",                          "model.embed_tokens.weight",                        IDENTITY),
    Rule("norm.scale",                            "model.norm.weight",                                IDENTITY),
    Rule("lm_head",                               "lm_head.weight",                                   LINEAR, "untied"),
    Rule("layers.input_layernorm.scale",          "model.layers.{i}.input_layernorm.weight",          IDENTITY),
    Rule("layers.post_attention_layernorm.scale", "model.layers.{i}.post_attention_layernorm.weight", IDENTITY),
    Rule("layers.self_attn.q_proj.kernel",        "model.layers.{i}.self_attn.q_proj.weight",         LINEAR),
    Rule("layers.self_attn.q_proj.bias",          "model.layers.{i}.self_attn.q_proj.bias",           IDENTITY, "attention_bias"),
    Rule("layers.self_attn.q_proj.lora_a",        "model.layers.{i}.self_attn.q_proj.lora_A.weight",  LINEAR, "lora:q_proj"),
    Rule("layers.self_attn.q_proj.lora_b",        "model.layers.{i}.self_attn.q_proj.lora_B.weight",  LINEAR, "lora:q_proj"),
    Rule("layers.self_attn.k_proj.kernel",        "model.layers.{i}.self_attn.k_proj.weight",         LINEAR),
    Rule("layers.self_attn.k_proj.bias",          "model.layers.{i}.self_attn.k_proj.bias",           IDENTITY, "attention_bias"),
    Rule("layers.self_attn.k_proj.lora_a",        "model.layers.{i}.self_attn.k_proj.lora_A.weight",  LINEAR, "lora:k_proj"),
    Rule("layers.self_attn.k_proj.lora_b",        "model.layers.{i}.self_attn.k_proj.lora_B.weight",  LINEAR, "lora:k_proj"),
    Rule("layers.self_attn.v_proj.kernel",        "model.layers.{i}.self_attn.v_proj.weight",         LINEAR),
    Rule("layers.self_attn.v_proj.bias",          "model.layers.{i}.self_attn.v_proj.bias",           IDENTITY, "attention_bias"),
    Rule("layers.self_attn.v_proj.lora_a",        "model.layers.{i}.self_attn.v_proj.lora_A.weight",  LINEAR, "lora:v_proj"),
    Rule("layers.self_attn.v_proj.lora_b",        "model.layers.{i}.self_attn.v_proj.lora_B.weight",  LINEAR, "lora:v_proj"),
    Rule("layers.self_attn.o_proj.kernel",        "model.layers.{i}.self_attn.o_proj.weight",         LINEAR),
    Rule("layers.self_attn.o_proj.lora_a",        "model.layers.{i}.self_attn.o_proj.lora_A.weight",  LINEAR, "lora:o_proj"),
    Rule("layers.self_attn.o_proj.lora_b",        "model.layers.{i}.self_attn.o_proj.lora_B.weight",  LINEAR, "lora:o_proj"),
    Rule("layers.mlp.gate_proj.kernel",           "model.layers.{i}.mlp.gate_proj.weight",            LINEAR),
    Rule("layers.mlp.gate_proj.lora_a",           "model.layers.{i}.mlp.gate_proj.lora_A.weight",     LINEAR, "lora:gate_proj"),
    Rule("layers.mlp.gate_proj.lora_b",           "model.layers.{i}.mlp.gate_proj.lora_B.weight",     LINEAR, "lora:gate_proj"),
    Rule("layers.mlp.up_proj.kernel",             "model.layers.{i}.mlp.up_proj.weight",              LINEAR),
    Rule("layers.mlp.up_proj.lora_a",             "model.layers.{i}.mlp.up_proj.lora_A.weight",       LINEAR, "lora:up_proj"),
    Rule("layers.mlp.up_proj.lora_b",             "model.layers.{i}.mlp.up_proj.lora_B.weight",       LINEAR, "lora:up_proj"),
    Rule("layers.mlp.down_proj.kernel",           "model.layers.{i}.mlp.down_proj.weight",            LINEAR),
    Rule("layers.mlp.down_proj.lora_a",           "model.layers.{i}.mlp.down_proj.lora_A.weight",     LINEAR, "lora:down_proj"),
    Rule("layers.mlp.down_proj.lora_b",           "model.layers.{i}.mlp.down_proj.lora_B.weight",     LINEAR, "lora:down_proj"),
]


def whisper_rules(key_bias: bool = False) -> list[Rule]:
    """The HF ``WhisperEncoder`` rows (:data:`WHISPER`) of an encoder with or without a key bias."""
    return select(WHISPER, encoder_flags(key_bias), table="HF Whisper")


def qwen2_rules(cfg: LLMConfig, lora: LoRAConfig | None) -> list[Rule]:
    """The HF ``Qwen2ForCausalLM`` rows (:data:`QWEN2`) of ``cfg`` (LoRA A/B for ``lora``'s targets)."""
    return select(QWEN2, llm_flags(cfg, lora), table="HF Qwen2")


_PEFT_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def normalize_peft_key(key: str) -> str:
    """peft names -> plain HF names: strip ``base_model.model.``, ``.base_layer``, the adapter name."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    key = key.replace(".base_layer.", ".")
    return _PEFT_ADAPTER.sub(r".\1.weight", key)


# -- matching a checkpoint's keys against a table ---------------------------------------------------------------


@dataclasses.dataclass
class Match:
    """A checkpoint's keys paired with a table: ``leaves`` ``{JAX path: [(key, entry)]}`` and ``problems``
    (missing, unexpected and doubly named keys), empty when the checkpoint is complete."""

    leaves: dict[str, list[tuple[str, Entry]]]
    problems: list[str]


def _match(entries: list[Entry], keys: Mapping[str, str], unexpected: Iterable[str], what: str, *,
           source: str, problems: list[str]) -> Match:
    missing = [e.torch_key for e in entries if e.torch_key not in keys]
    if missing:
        problems.append(f"{source}: {len(missing)} missing key(s): {missing[:12]}")
    used = {keys[e.torch_key] for e in entries if e.torch_key in keys}
    extra = sorted(k for k in unexpected if k not in used)
    if extra:
        problems.append(f"{source}: {len(extra)} unexpected {what}key(s): {extra[:12]}")
    return Match(group(entries, keys), problems)


def match_whisper(keys: Iterable[str], num_layers: int, *, key_bias: bool = False,
                  source: str = "Whisper checkpoint") -> Match:
    """Pair HF Whisper keys with :func:`whisper_rules`. The encoder is found under ``model.encoder.``,
    ``encoder.`` or at the top (a bare ``WhisperEncoder``); keys outside it (decoder, projection) are ignored."""
    keys = list(keys)
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in keys)), "")
    scope = [k for k in keys if k.startswith(prefix)]
    entries = expand(whisper_rules(key_bias), {"layers.": num_layers})
    return _match(entries, {k[len(prefix):]: k for k in scope}, scope, "encoder ", source=source, problems=[])


def match_qwen2(keys: Iterable[str], cfg: LLMConfig, lora: LoRAConfig | None = None, *,
                source: str = "Qwen2 checkpoint") -> Match:
    """Pair HF ``Qwen2ForCausalLM`` keys (plain or peft names) with :func:`qwen2_rules`. With ``lora`` given,
    LoRA A/B tensors are required for its targets; without, LoRA keys are unexpected. Rotary ``inv_freq``
    buffers are ignored, and so is ``lm_head.weight`` of a tied model."""
    problems: list[str] = []
    names: dict[str, str] = {}
    for k in keys:
        n = normalize_peft_key(k)
        if n in names:
            problems.append(f"{source}: {names[n]} and {k} are the same tensor in two naming styles")
        names[n] = k
    ignore = [r".*rotary_emb\.inv_freq"] + ([r"lm_head\.weight"] if cfg.tie_word_embeddings else [])
    counted = [k for n, k in names.items() if not any(re.fullmatch(p, n) for p in ignore)]
    entries = expand(qwen2_rules(cfg, lora), {"layers.": cfg.num_layers})
    return _match(entries, names, counted, "", source=source, problems=problems)


def _applied(match: Match, state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    if match.problems:
        raise CheckpointMismatch("; ".join(match.problems))
    return assemble(state, match.leaves, source=source)


def whisper_encoder_from_hf(state: Mapping[str, np.ndarray], num_layers: int, *, key_bias: bool = False,
                            source: str = "Whisper checkpoint") -> dict[str, np.ndarray]:
    """HF Whisper state dict -> ``WhisperEncoder`` arrays (:func:`match_whisper`, then the transforms)."""
    return _applied(match_whisper(state, num_layers, key_bias=key_bias, source=source), state, source)


def qwen2_from_hf(state: Mapping[str, np.ndarray], cfg: LLMConfig, lora: LoRAConfig | None = None, *,
                  source: str = "Qwen2 checkpoint") -> dict[str, np.ndarray]:
    """HF ``Qwen2ForCausalLM`` (optionally peft-wrapped) state dict -> ``Qwen2`` arrays (:func:`match_qwen2`,
    then the transforms)."""
    return _applied(match_qwen2(state, cfg, lora, source=source), state, source)
