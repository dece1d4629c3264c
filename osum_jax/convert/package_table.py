"""The torch package's rule table (``docs/package-format.md``) and the tensor plan that export-torch writes.

The table is :data:`PACKAGE`, one literal row per tensor: the Whisper encoder under ``encoder.`` (Hugging Face
``WhisperEncoder`` names), the adapter under ``adapter.``, ``speech_embed.weight`` and the LLM under ``llm.``
(Hugging Face ``Qwen2ForCausalLM`` names). Shapes come from ``transform.external_shape`` and values from
``transform.inverse``; merging LoRA into the base kernels is the one hook outside the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from osum_torch_infer.package import PackageError  # noqa: F401 (the one class, the contract's; re-exported)

from ..checkpoint import flat_variables
from ..config import ModelConfig
from .rules import CONV, IDENTITY, LINEAR, Entry, Rule, expand, model_flags, model_stacks, select


# (JAX path in ``OSUM``, package tensor name, transform[, when]), in the package's tensor order; ``{i}``: a layer
# of a stack. LoRA A/B rows go to the adapter file under peft's names (:data:`PEFT_PREFIX`) or are merged.
PACKAGE = [
    Rule("encoder.conv1.kernel",                                  "encoder.conv1.weight",                                 CONV),
    Rule("encoder.conv1.bias",                                    "encoder.conv1.bias",                                   IDENTITY),
    Rule("encoder.conv2.kernel",                                  "encoder.conv2.weight",                                 CONV),
    Rule("encoder.conv2.bias",                                    "encoder.conv2.bias",                                   IDENTITY),
    Rule("encoder.embed_positions",                               "encoder.embed_positions.weight",                       IDENTITY),
    Rule("encoder.layer_norm.scale",                              "encoder.layer_norm.weight",                            IDENTITY),
    Rule("encoder.layer_norm.bias",                               "encoder.layer_norm.bias",                              IDENTITY),
    Rule("encoder.layers.self_attn_layer_norm.scale",             "encoder.layers.{i}.self_attn_layer_norm.weight",       IDENTITY),
    Rule("encoder.layers.self_attn_layer_norm.bias",              "encoder.layers.{i}.self_attn_layer_norm.bias",         IDENTITY),
    Rule("encoder.layers.self_attn.q_proj.kernel",                "encoder.layers.{i}.self_attn.q_proj.weight",           LINEAR),
    Rule("encoder.layers.self_attn.q_proj.bias",                  "encoder.layers.{i}.self_attn.q_proj.bias",             IDENTITY),
    Rule("encoder.layers.self_attn.k_proj.kernel",                "encoder.layers.{i}.self_attn.k_proj.weight",           LINEAR),
    Rule("encoder.layers.self_attn.v_proj.kernel",                "encoder.layers.{i}.self_attn.v_proj.weight",           LINEAR),
    Rule("encoder.layers.self_attn.v_proj.bias",                  "encoder.layers.{i}.self_attn.v_proj.bias",             IDENTITY),
    Rule("encoder.layers.self_attn.out_proj.kernel",              "encoder.layers.{i}.self_attn.out_proj.weight",         LINEAR),
    Rule("encoder.layers.self_attn.out_proj.bias",                "encoder.layers.{i}.self_attn.out_proj.bias",           IDENTITY),
    Rule("encoder.layers.final_layer_norm.scale",                 "encoder.layers.{i}.final_layer_norm.weight",           IDENTITY),
    Rule("encoder.layers.final_layer_norm.bias",                  "encoder.layers.{i}.final_layer_norm.bias",             IDENTITY),
    Rule("encoder.layers.fc1.kernel",                             "encoder.layers.{i}.fc1.weight",                        LINEAR),
    Rule("encoder.layers.fc1.bias",                               "encoder.layers.{i}.fc1.bias",                          IDENTITY),
    Rule("encoder.layers.fc2.kernel",                             "encoder.layers.{i}.fc2.weight",                        LINEAR),
    Rule("encoder.layers.fc2.bias",                               "encoder.layers.{i}.fc2.bias",                          IDENTITY),
    Rule("encoder.layers.self_attn.k_proj.bias",                  "encoder.layers.{i}.self_attn.k_proj.bias",             IDENTITY, "key_bias"),
    Rule("adapter.downsample.convs.0.kernel",                     "adapter.convs.0.weight",                               CONV, "conv0"),
    Rule("adapter.downsample.convs.0.bias",                       "adapter.convs.0.bias",                                 IDENTITY, "conv0"),
    Rule("adapter.downsample.convs.1.kernel",                     "adapter.convs.1.weight",                               CONV, "conv1"),
    Rule("adapter.downsample.convs.1.bias",                       "adapter.convs.1.bias",                                 IDENTITY, "conv1"),
    Rule("adapter.downsample.convs.2.kernel",                     "adapter.convs.2.weight",                               CONV, "conv2"),
    Rule("adapter.downsample.convs.2.bias",                       "adapter.convs.2.bias",                                 IDENTITY, "conv2"),
    Rule("adapter.transformer.input_proj.kernel",                 "adapter.input_proj.weight",                            LINEAR),
    Rule("adapter.transformer.input_proj.bias",                   "adapter.input_proj.bias",                              IDENTITY),
    Rule("adapter.transformer.input_norm.scale",                  "adapter.input_norm.weight",                            IDENTITY),
    Rule("adapter.transformer.input_norm.bias",                   "adapter.input_norm.bias",                              IDENTITY),
    Rule("adapter.transformer.pos_table",                         "adapter.embed_positions.weight",                       IDENTITY),
    Rule("adapter.transformer.layer_norm.scale",                  "adapter.layer_norm.weight",                            IDENTITY),
    Rule("adapter.transformer.layer_norm.bias",                   "adapter.layer_norm.bias",                              IDENTITY),
    Rule("adapter.proj.kernel",                                   "adapter.proj.weight",                                  LINEAR),
    Rule("adapter.proj.bias",                                     "adapter.proj.bias",                                    IDENTITY),
    Rule("adapter.transformer.layers.self_attn_layer_norm.scale", "adapter.layers.{i}.self_attn_layer_norm.weight",       IDENTITY),
    Rule("adapter.transformer.layers.self_attn_layer_norm.bias",  "adapter.layers.{i}.self_attn_layer_norm.bias",         IDENTITY),
    Rule("adapter.transformer.layers.self_attn.q_proj.kernel",    "adapter.layers.{i}.self_attn.q_proj.weight",           LINEAR),
    Rule("adapter.transformer.layers.self_attn.q_proj.bias",      "adapter.layers.{i}.self_attn.q_proj.bias",             IDENTITY),
    Rule("adapter.transformer.layers.self_attn.k_proj.kernel",    "adapter.layers.{i}.self_attn.k_proj.weight",           LINEAR),
    Rule("adapter.transformer.layers.self_attn.v_proj.kernel",    "adapter.layers.{i}.self_attn.v_proj.weight",           LINEAR),
    Rule("adapter.transformer.layers.self_attn.v_proj.bias",      "adapter.layers.{i}.self_attn.v_proj.bias",             IDENTITY),
    Rule("adapter.transformer.layers.self_attn.out_proj.kernel",  "adapter.layers.{i}.self_attn.out_proj.weight",         LINEAR),
    Rule("adapter.transformer.layers.self_attn.out_proj.bias",    "adapter.layers.{i}.self_attn.out_proj.bias",           IDENTITY),
    Rule("adapter.transformer.layers.final_layer_norm.scale",     "adapter.layers.{i}.final_layer_norm.weight",           IDENTITY),
    Rule("adapter.transformer.layers.final_layer_norm.bias",      "adapter.layers.{i}.final_layer_norm.bias",             IDENTITY),
    Rule("adapter.transformer.layers.fc1.kernel",                 "adapter.layers.{i}.fc1.weight",                        LINEAR),
    Rule("adapter.transformer.layers.fc1.bias",                   "adapter.layers.{i}.fc1.bias",                          IDENTITY),
    Rule("adapter.transformer.layers.fc2.kernel",                 "adapter.layers.{i}.fc2.weight",                        LINEAR),
    Rule("adapter.transformer.layers.fc2.bias",                   "adapter.layers.{i}.fc2.bias",                          IDENTITY),
    Rule("adapter.transformer.layers.self_attn.k_proj.bias",      "adapter.layers.{i}.self_attn.k_proj.bias",             IDENTITY),
    Rule("speech_embed",                                          "speech_embed.weight",                                  IDENTITY),
    Rule("llm.embed_tokens",                                      "llm.model.embed_tokens.weight",                        IDENTITY),
    Rule("llm.norm.scale",                                        "llm.model.norm.weight",                                IDENTITY),
    Rule("llm.lm_head",                                           "llm.lm_head.weight",                                   LINEAR, "untied"),
    Rule("llm.layers.input_layernorm.scale",                      "llm.model.layers.{i}.input_layernorm.weight",          IDENTITY),
    Rule("llm.layers.post_attention_layernorm.scale",             "llm.model.layers.{i}.post_attention_layernorm.weight", IDENTITY),
    Rule("llm.layers.self_attn.q_proj.kernel",                    "llm.model.layers.{i}.self_attn.q_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.q_proj.bias",                      "llm.model.layers.{i}.self_attn.q_proj.bias",           IDENTITY, "attention_bias"),
    Rule("llm.layers.self_attn.q_proj.lora_a",                    "llm.model.layers.{i}.self_attn.q_proj.lora_A.weight",  LINEAR, "lora:q_proj"),
    Rule("llm.layers.self_attn.q_proj.lora_b",                    "llm.model.layers.{i}.self_attn.q_proj.lora_B.weight",  LINEAR, "lora:q_proj"),
    Rule("llm.layers.self_attn.k_proj.kernel",                    "llm.model.layers.{i}.self_attn.k_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.k_proj.bias",                      "llm.model.layers.{i}.self_attn.k_proj.bias",           IDENTITY, "attention_bias"),
    Rule("llm.layers.self_attn.k_proj.lora_a",                    "llm.model.layers.{i}.self_attn.k_proj.lora_A.weight",  LINEAR, "lora:k_proj"),
    Rule("llm.layers.self_attn.k_proj.lora_b",                    "llm.model.layers.{i}.self_attn.k_proj.lora_B.weight",  LINEAR, "lora:k_proj"),
    Rule("llm.layers.self_attn.v_proj.kernel",                    "llm.model.layers.{i}.self_attn.v_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.v_proj.bias",                      "llm.model.layers.{i}.self_attn.v_proj.bias",           IDENTITY, "attention_bias"),
    Rule("llm.layers.self_attn.v_proj.lora_a",                    "llm.model.layers.{i}.self_attn.v_proj.lora_A.weight",  LINEAR, "lora:v_proj"),
    Rule("llm.layers.self_attn.v_proj.lora_b",                    "llm.model.layers.{i}.self_attn.v_proj.lora_B.weight",  LINEAR, "lora:v_proj"),
    Rule("llm.layers.self_attn.o_proj.kernel",                    "llm.model.layers.{i}.self_attn.o_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.o_proj.lora_a",                    "llm.model.layers.{i}.self_attn.o_proj.lora_A.weight",  LINEAR, "lora:o_proj"),
    Rule("llm.layers.self_attn.o_proj.lora_b",                    "llm.model.layers.{i}.self_attn.o_proj.lora_B.weight",  LINEAR, "lora:o_proj"),
    Rule("llm.layers.mlp.gate_proj.kernel",                       "llm.model.layers.{i}.mlp.gate_proj.weight",            LINEAR),
    Rule("llm.layers.mlp.gate_proj.lora_a",                       "llm.model.layers.{i}.mlp.gate_proj.lora_A.weight",     LINEAR, "lora:gate_proj"),
    Rule("llm.layers.mlp.gate_proj.lora_b",                       "llm.model.layers.{i}.mlp.gate_proj.lora_B.weight",     LINEAR, "lora:gate_proj"),
    Rule("llm.layers.mlp.up_proj.kernel",                         "llm.model.layers.{i}.mlp.up_proj.weight",              LINEAR),
    Rule("llm.layers.mlp.up_proj.lora_a",                         "llm.model.layers.{i}.mlp.up_proj.lora_A.weight",       LINEAR, "lora:up_proj"),
    Rule("llm.layers.mlp.up_proj.lora_b",                         "llm.model.layers.{i}.mlp.up_proj.lora_B.weight",       LINEAR, "lora:up_proj"),
    Rule("llm.layers.mlp.down_proj.kernel",                       "llm.model.layers.{i}.mlp.down_proj.weight",            LINEAR),
    Rule("llm.layers.mlp.down_proj.lora_a",                       "llm.model.layers.{i}.mlp.down_proj.lora_A.weight",     LINEAR, "lora:down_proj"),
    Rule("llm.layers.mlp.down_proj.lora_b",                       "llm.model.layers.{i}.mlp.down_proj.lora_B.weight",     LINEAR, "lora:down_proj"),
]
PEFT_PREFIX = "base_model.model."  # LoRA tensors kept apart: peft's names for the Qwen2 model, adapter name dropped


def package_rules(cfg: ModelConfig) -> list[Rule]:
    """The rows of :data:`PACKAGE` that ``OSUM(cfg)`` has, in the package's tensor order."""
    return select(PACKAGE, model_flags(cfg), table="torch package")


package_stacks = model_stacks  # the scanned stacks (one definition, in .rules)


@dataclass
class PackageTensor:
    """One output tensor: its torch name, shape, and how to produce it (numpy, in the stored dtype)."""

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    file: str = "model"  # "model" or "adapter"


def plan_package(model, cfg: ModelConfig, merge_lora: bool) -> list[PackageTensor]:
    """Every output tensor in the table's order (a stacked variable row by row: all layers of one tensor name,
    then the next), with lazy producers (one layer of a stacked variable each).

    ``model``: an OSUM module, or ``{dotted path: leaf}`` with leaves that have ``shape``, ``leaf[i]`` and
    ``get_value()`` (e.g. :class:`osum_jax.checkpoint.LazyLeaf`, read from disk on demand). With ``merge_lora``
    the LoRA A/B variables are folded into their kernels (in float32); without, they go to the ``adapter`` file
    under peft's names."""
    variables = dict(model) if isinstance(model, Mapping) else flat_variables(model)
    used: set[str] = set()

    def var(path: str):
        if path not in variables:
            raise PackageError(f"the model has no variable {path!r} (is it an OSUM built from this config?)")
        used.add(path)
        return variables[path]

    entries = expand(package_rules(cfg), package_stacks(cfg), layer_major=False)
    with_lora = {e.jax_path.rsplit(".", 1)[0] for e in entries if e.jax_path.endswith(".lora_a")}
    scaling = float(cfg.lora.scaling)
    out: list[PackageTensor] = []
    for e in entries:
        v = var(e.jax_path)
        module, _, leaf = e.jax_path.rpartition(".")
        name, file = e.torch_key, "model"
        if leaf in ("lora_a", "lora_b"):
            if merge_lora:
                continue  # folded into the kernel
            name, file = PEFT_PREFIX + name[len("llm."):], "adapter"
        if merge_lora and leaf == "kernel" and module in with_lora:
            produce = _merged(v, var(f"{module}.lora_a"), var(f"{module}.lora_b"), e.layer, scaling)
        else:
            produce = _inverse(v, e)
        out.append(PackageTensor(name, e.external_shape(v.shape), produce, file))
    left = sorted(set(variables) - used)
    if left:
        raise PackageError(f"model variables not covered by the package name table: {left[:20]}")
    return out


def _inverse(v, e: Entry) -> Callable[[], np.ndarray]:
    """``transform.inverse`` of the variable (``layer is None``) or of one layer of it, read when called."""
    if e.layer is None:
        return lambda: e.transform.inverse(np.asarray(v.get_value()))
    return lambda: e.transform.inverse(np.asarray(v[e.layer]))


def _merged(k, a, b, i: int, scaling: float) -> Callable[[], np.ndarray]:
    """The LoRA hook: layer ``i`` of ``kernel + scaling * A @ B`` (float32), as a torch ``[out, in]`` weight."""
    def produce() -> np.ndarray:
        w = np.asarray(k[i], np.float32)
        delta = np.asarray(a[i], np.float32) @ np.asarray(b[i], np.float32)
        return LINEAR.inverse(w + np.float32(scaling) * delta)
    return produce
