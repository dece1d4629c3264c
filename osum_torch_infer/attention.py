"""The LLM's attention: transformers' SDPA, with masks that never leave a query row with no key at all.

In a left-padded batch the pad positions see no key (causal + padding), and in the teacher-forced contract the
prompt holes can too. transformers 5.x's SDPA mask no longer patches such rows, and depending on the CUDA / NPU
kernel they come out NaN, which then spreads through the whole row of the batch (``0 * NaN``): every padded
utterance decodes to garbage while CPU kernels return finite values. Here such rows attend to every key instead
(their outputs are never read), once per forward in the mask, for our prefill and for ``generate`` alike.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_IMPLEMENTATION = "osum_sdpa"


def unmask_empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean (True = attend) or additive (0 / -inf) 4D mask with every fully masked query row opened."""
    if not isinstance(mask, torch.Tensor):
        return mask
    if mask.dtype == torch.bool:
        return mask | ~mask.any(dim=-1, keepdim=True)
    empty = (mask == torch.finfo(mask.dtype).min).all(dim=-1, keepdim=True) | torch.isneginf(mask).all(
        dim=-1, keepdim=True)
    return mask.masked_fill(empty, 0.0)


def safe_sdpa_mask(*args, **kwargs):
    return unmask_empty_rows(sdpa_mask(*args, **kwargs))


AttentionMaskInterface.register(ATTN_IMPLEMENTATION, safe_sdpa_mask)
AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_attention_forward)
