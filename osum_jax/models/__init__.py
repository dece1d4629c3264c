"""Flax NNX modules of OSUM. See ``osum.py`` for the composite and the batch contract."""

from .adapter import Adapter, conv_stack_lengths
from .lora import LoRALinear, merge_lora_
from .ops import Ops
from .osum import OSUM, check_batch, masked_cross_entropy
from .qwen2 import Qwen2
from .whisper import WhisperEncoder, whisper_output_lengths

__all__ = [
    "Adapter", "LoRALinear", "OSUM", "Ops", "Qwen2", "WhisperEncoder", "check_batch", "conv_stack_lengths",
    "masked_cross_entropy", "merge_lora_", "whisper_output_lengths",
]
