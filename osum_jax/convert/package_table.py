"""The torch package's rule table (``docs/package-format.md``) and the tensor plan that export-torch writes.

Tensor names are torch names: the Whisper encoder under ``encoder.`` (Hugging Face ``WhisperEncoder`` names,
:func:`osum_jax.convert.hf.whisper_rules`), the adapter under ``adapter.``, ``speech_embed.weight`` and the LLM
under ``llm.`` (Hugging Face ``Qwen2ForCausalLM`` names, :func:`osum_jax.convert.hf.qwen2_rules`). Shapes come
from ``transform.external_shape`` and values from ``transform.inverse``; merging LoRA into the base kernels is the
one hook outside the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..checkpoint import flat_variables
from ..config import ModelConfig
from .hf import qwen2_rules, whisper_layer_rules, whisper_rules
from .rules import CONV, IDENTITY, LINEAR, Entry, Rule, expand, over_layers, prefixed


class PackageError(ValueError):
    """The package cannot be written (existing output, bad tokenizer, fp16 overflow...); the message says why."""


# Our torch names for the adapter, relative to "adapter." (JAX path relative to model.adapter, torch key)
ADAPTER_TOP = [
    Rule("transformer.input_proj.kernel", "input_proj.weight", LINEAR),
    Rule("transformer.input_proj.bias", "input_proj.bias", IDENTITY),
    Rule("transformer.input_norm.scale", "input_norm.weight", IDENTITY),
    Rule("transformer.input_norm.bias", "input_norm.bias", IDENTITY),
    Rule("transformer.pos_table", "embed_positions.weight", IDENTITY),
    Rule("transformer.layer_norm.scale", "layer_norm.weight", IDENTITY),
    Rule("transformer.layer_norm.bias", "layer_norm.bias", IDENTITY),
    Rule("proj.kernel", "proj.weight", LINEAR),
    Rule("proj.bias", "proj.bias", IDENTITY),
]
PEFT_PREFIX = "base_model.model."  # LoRA tensors kept apart: peft's names for the Qwen2 model, adapter name dropped


def package_rules(cfg: ModelConfig) -> list[Rule]:
    """The package's table, in the package's tensor order (LoRA A/B rows included when ``cfg.lora.enabled``)."""
    rows = prefixed(whisper_rules(cfg.encoder.key_bias), "encoder.", "encoder.")
    for i in range(len(cfg.adapter.conv_strides)):
        rows += [Rule(f"adapter.downsample.convs.{i}.kernel", f"adapter.convs.{i}.weight", CONV),
                 Rule(f"adapter.downsample.convs.{i}.bias", f"adapter.convs.{i}.bias", IDENTITY)]
    rows += prefixed(ADAPTER_TOP, "adapter.", "adapter.")
    rows += over_layers(whisper_layer_rules(True), "adapter.transformer.layers.", "adapter.layers.")
    rows.append(Rule("speech_embed", "speech_embed.weight", IDENTITY))
    rows += prefixed(qwen2_rules(cfg.llm, cfg.lora if cfg.lora.enabled else None), "llm.", "llm.")
    return rows


def package_stacks(cfg: ModelConfig) -> dict[str, int]:
    return {"encoder.layers.": cfg.encoder.num_layers, "adapter.transformer.layers.": cfg.adapter.num_layers,
            "llm.layers.": cfg.llm.num_layers}


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
