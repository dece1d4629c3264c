"""What trains: OSUM's ``fire_module`` choices as NNX filters.

The names say what fires (trains). As in OSUM with peft, the base LLM weights are frozen whenever LoRA is on;
only ``all`` (training from scratch) updates them.

=============================  ===================================================================
fire_module                    trainable parameters
=============================  ===================================================================
link                           adapter (convs, speech transformer, projection) + speech bos/eos
encoder                        Whisper encoder
llm                            LoRA adapters (the whole LLM if LoRA is disabled)
lora                           LoRA adapters
link_and_encoder               encoder + adapter + speech bos/eos
link_and_encoder_and_lora      encoder + adapter + speech bos/eos + LoRA  (OSUM's setting)
all                            every parameter, the base LLM included
=============================  ===================================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import FIRE_MODULES

_ENCODER = nnx.All(nnx.Param, nnx.PathContains("encoder"))
_LINK = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("adapter"), nnx.PathContains("speech_embed")))
_LLM = nnx.All(nnx.Param, nnx.PathContains("llm"))


def trainable_filter(fire_module: str, lora_enabled: bool = True):
    if fire_module not in FIRE_MODULES:
        raise ValueError(f"unknown fire_module {fire_module!r}; expected one of {FIRE_MODULES}")
    lora = nnx.LoRAParam if lora_enabled else _LLM
    table = {
        "link": _LINK,
        "encoder": _ENCODER,
        "llm": lora,
        "lora": nnx.LoRAParam,
        "link_and_encoder": nnx.Any(_ENCODER, _LINK),
        "link_and_encoder_and_lora": nnx.Any(_ENCODER, _LINK, lora),
        "all": nnx.Param,
    }
    return table[fire_module]


def frozen_filter(fire_module: str, lora_enabled: bool = True):
    return nnx.All(nnx.Param, nnx.Not(trainable_filter(fire_module, lora_enabled)))


def cast_frozen_(model: nnx.Module, fire_module: str, dtype, lora_enabled: bool = True) -> int:
    """Store frozen parameters in ``dtype`` (e.g. bfloat16) in place; returns how many were cast."""
    n = 0
    flt = frozen_filter(fire_module, lora_enabled)
    state = nnx.state(model, flt)
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if var.get_value().dtype != dtype:
            var.set_value(var.get_value().astype(dtype))
            n += 1
    nnx.update(model, state)
    return n


def count(model: nnx.Module, flt) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(nnx.state(model, flt)))
