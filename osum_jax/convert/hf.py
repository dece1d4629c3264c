"""Rule tables between Hugging Face torch checkpoints and the JAX modules, and the key matching that
``osum-convert import-hf`` and the parity tests share.

* Whisper (``WhisperEncoder`` / ``WhisperModel`` / ``WhisperForConditionalGeneration``): encoder only.
* Qwen2 (``Qwen2ForCausalLM``), optionally wrapped by peft (``base_model.model.`` prefix, ``base_layer``,
  ``lora_A.default`` / ``lora_B.default``) or saved with the plain pre-0.7 peft names.

Torch linear weights are ``[out, in]`` and become ``[in, out]`` kernels; torch Conv1d weights ``[out, in, k]``
become ``[k, in, out]``; per-layer tensors are stacked on the leading ``layers`` axis of the scanned modules
(:mod:`.rules`). :func:`match_whisper` / :func:`match_qwen2` pair a checkpoint's keys with the table;
:func:`whisper_encoder_from_hf` / :func:`qwen2_from_hf` apply that match to an in-memory state dict.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import numpy as np

from ..checkpoint.tree import CheckpointMismatch
from ..config import LLMConfig, LoRAConfig
from .rules import CONV, IDENTITY, LINEAR, Entry, Rule, assemble, expand, group, over_layers

# rows of a bare WhisperEncoder outside its layers: (JAX path in WhisperEncoder, HF key, transform)
WHISPER_TOP = [
    Rule("conv1.kernel", "conv1.weight", CONV),
    Rule("conv1.bias", "conv1.bias", IDENTITY),
    Rule("conv2.kernel", "conv2.weight", CONV),
    Rule("conv2.bias", "conv2.bias", IDENTITY),
    Rule("embed_positions", "embed_positions.weight", IDENTITY),
    Rule("layer_norm.scale", "layer_norm.weight", IDENTITY),
    Rule("layer_norm.bias", "layer_norm.bias", IDENTITY),
]
# rows inside one encoder layer (module-relative)
WHISPER_LAYER = [
    Rule("self_attn_layer_norm.scale", "self_attn_layer_norm.weight", IDENTITY),
    Rule("self_attn_layer_norm.bias", "self_attn_layer_norm.bias", IDENTITY),
    Rule("self_attn.q_proj.kernel", "self_attn.q_proj.weight", LINEAR),
    Rule("self_attn.q_proj.bias", "self_attn.q_proj.bias", IDENTITY),
    Rule("self_attn.k_proj.kernel", "self_attn.k_proj.weight", LINEAR),
    Rule("self_attn.v_proj.kernel", "self_attn.v_proj.weight", LINEAR),
    Rule("self_attn.v_proj.bias", "self_attn.v_proj.bias", IDENTITY),
    Rule("self_attn.out_proj.kernel", "self_attn.out_proj.weight", LINEAR),
    Rule("self_attn.out_proj.bias", "self_attn.out_proj.bias", IDENTITY),
    Rule("final_layer_norm.scale", "final_layer_norm.weight", IDENTITY),
    Rule("final_layer_norm.bias", "final_layer_norm.bias", IDENTITY),
    Rule("fc1.kernel", "fc1.weight", LINEAR),
    Rule("fc1.bias", "fc1.bias", IDENTITY),
    Rule("fc2.kernel", "fc2.weight", LINEAR),
    Rule("fc2.bias", "fc2.bias", IDENTITY),
]
K_BIAS = Rule("self_attn.k_proj.bias", "self_attn.k_proj.bias", IDENTITY)  # only blocks with key_bias


def whisper_layer_rules(key_bias: bool) -> list[Rule]:
    """The rows of one encoder block (Whisper's own blocks have no key bias; the adapter's have one)."""
    return WHISPER_LAYER + ([K_BIAS] if key_bias else [])


def whisper_rules(key_bias: bool = False) -> list[Rule]:
    """The HF ``WhisperEncoder`` table (JAX paths relative to ``WhisperEncoder``)."""
    return WHISPER_TOP + over_layers(whisper_layer_rules(key_bias), "layers.", "layers.")


QWEN2_TOP = [
    Rule("embed_tokens", "model.embed_tokens.weight", IDENTITY),
    Rule("norm.scale", "model.norm.weight", IDENTITY),
    Rule("lm_head", "lm_head.weight", LINEAR),
]
QWEN2_PROJ = {  # module path -> has bias
    "self_attn.q_proj": True, "self_attn.k_proj": True, "self_attn.v_proj": True, "self_attn.o_proj": False,
    "mlp.gate_proj": False, "mlp.up_proj": False, "mlp.down_proj": False,
}


def qwen2_layer_rules(cfg: LLMConfig, lora: LoRAConfig | None) -> list[Rule]:
    """The rows of one decoder layer (module-relative; LoRA A/B for ``lora``'s targets)."""
    rows = [
        Rule("input_layernorm.scale", "input_layernorm.weight", IDENTITY),
        Rule("post_attention_layernorm.scale", "post_attention_layernorm.weight", IDENTITY),
    ]
    for mod, has_bias in QWEN2_PROJ.items():
        rows.append(Rule(f"{mod}.kernel", f"{mod}.weight", LINEAR))
        if has_bias and cfg.attention_bias:
            rows.append(Rule(f"{mod}.bias", f"{mod}.bias", IDENTITY))
        if lora is not None and lora.rank_of(mod.split(".")[-1]):
            rows.append(Rule(f"{mod}.lora_a", f"{mod}.lora_A.weight", LINEAR))
            rows.append(Rule(f"{mod}.lora_b", f"{mod}.lora_B.weight", LINEAR))
    return rows


def qwen2_rules(cfg: LLMConfig, lora: LoRAConfig | None) -> list[Rule]:
    """The HF ``Qwen2ForCausalLM`` table (plain HF names; JAX paths relative to ``Qwen2``)."""
    top = [r for r in QWEN2_TOP if not (cfg.tie_word_embeddings and r.jax == "lm_head")]
    return top + over_layers(qwen2_layer_rules(cfg, lora), "layers.", "model.layers.")


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
