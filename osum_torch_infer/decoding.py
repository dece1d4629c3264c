"""The lean greedy decoding loop, and when it applies.

``OSUMForConditionalGeneration.generate`` decodes plain greedy configurations with :func:`greedy_decode` and the
rest (beam search, sampling, penalties) with transformers' ``generate``. The loop computes the same tokens (tested)
without ``generate``'s per-token machinery; it stays for the accelerators rather than for CPU speed (there its
gain, 4.30 vs 4.63 ms/token, is inside the benchmark's noise): ``generate``'s ``EosTokenCriteria`` calls
``torch.isin`` every token, which falls back to the CPU on Ascend NPUs (a host sync per token), while this loop
checks the end ids with an equality reduction and looks at the stop condition every 8 tokens on accelerators.

The loop guard (:func:`looping_rows`, :func:`loop_stopping_criteria`, :func:`trim_loop`) ends a row whose last tokens are one
n-gram repeated ``repeats`` times in a row, in both engines, and keeps one copy of the repeated n-gram.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def looping_rows(tokens: torch.Tensor, repeats: int, max_ngram: int) -> torch.Tensor:
    """``[B]`` bool: the rows of ``tokens [B, T]`` whose last ``n * repeats`` tokens are one n-gram repeated
    ``repeats`` times in a row, for some ``n <= max_ngram`` (a sequence of period ``n`` over that span)."""
    b, t = tokens.shape
    hit = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    for n in range(1, max_ngram + 1):
        span = n * repeats
        if span > t:
            break
        tail = tokens[:, t - span:]
        hit |= (tail[:, n:] == tail[:, :-n]).all(-1)
    return hit


def loop_ngram(tokens: Sequence[int], repeats: int, max_ngram: int) -> int:
    """The shortest ``n <= max_ngram`` such that ``tokens`` ends with one n-gram repeated ``repeats`` times in a row;
    0 when there is none."""
    tokens = list(tokens)
    for n in range(1, max_ngram + 1):
        span = n * repeats
        if span > len(tokens):
            break
        tail = tokens[-span:]
        if tail[n:] == tail[:-n]:
            return n
    return 0


def trim_loop(tokens: Sequence[int], repeats: int, max_ngram: int) -> list[int]:
    """``tokens`` with a looping tail (see :func:`loop_ngram`) cut to one copy of its n-gram: what a row the guard
    stopped keeps."""
    tokens = list(tokens)
    n = loop_ngram(tokens, repeats, max_ngram) if repeats >= 2 else 0
    return tokens[:len(tokens) - n * (repeats - 1)] if n else tokens


def check_loop_guard(repeats: int, max_ngram: int) -> None:
    """``ValueError`` for settings the guard cannot use (``repeats`` 0 turns it off)."""
    if repeats != 0 and repeats < 2:
        raise ValueError(f"loop_repeats must be 0 (off) or an integer >= 2, got {repeats}")
    if max_ngram < 1:
        raise ValueError(f"loop_max_ngram must be an integer >= 1, got {max_ngram}")


def loop_stopping_criteria(repeats: int, max_ngram: int):
    """A ``transformers.StoppingCriteriaList`` holding :class:`LoopStop` (for ``generate``)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class LoopStop(StoppingCriteria):
        """Ends the rows whose generated tokens end in a loop (``generate`` passes only the new tokens when it is
        given ``inputs_embeds``); beam search treats such a beam as finished."""

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return looping_rows(input_ids, repeats, max_ngram)

    return StoppingCriteriaList([LoopStop()])


@torch.inference_mode()
def greedy_decode(llm, x: torch.Tensor, mask: torch.Tensor, generation_config,
                  loop_guard: tuple[int, int] | None = None) -> torch.Tensor:
    """Greedy decoding of left-padded prefix embeddings ``x [B, S, D]`` / ``mask [B, S]`` (from
    :meth:`build_prefix`): the new tokens ``[B, T]``, as ``llm.generate(inputs_embeds=x, ...)`` returns them.

    Computes exactly what ``transformers``' greedy ``generate`` computes (same model forward, same inputs:
    positions from the mask, no mask at all when nothing is padded, logits of the last position only, EOS
    masked while fewer than ``min_new_tokens`` tokens exist, argmax) without its per-token machinery
    (logits processors, stopping criteria, kwargs bookkeeping, output dataclasses). The KV cache is a
    transformers ``DynamicCache``, or a ``StaticCache`` (preallocated, no per-step concatenation) when
    ``generation_config.cache_implementation == "static"``. Finished rows are fed the pad id, as in
    ``generate``; decoding stops when every row has ended or after ``max_new_tokens`` tokens. ``loop_guard``
    ``(repeats, max_ngram)`` also ends a row at the token that completes a loop (:func:`looping_rows`), as
    :func:`loop_stopping_criteria` does in ``generate``."""
    from transformers import DynamicCache, StaticCache

    gc = generation_config
    b, s, _ = x.shape
    max_new = int(gc.max_new_tokens)
    min_new = int(gc.min_new_tokens or 0)
    eos = gc.eos_token_id if gc.eos_token_id is not None else llm.config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=x.device)
    pad = int(gc.pad_token_id if gc.pad_token_id is not None else eos_ids[0])
    mask = mask.to(torch.long)
    static = gc.cache_implementation == "static"
    padded = not bool(mask.all())
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    # generate() drops an all-ones mask (SDPA then runs causal without a mask); a static cache always needs one
    full_mask = torch.cat([mask, mask.new_ones(b, max_new)], dim=1) if (padded or static) else None
    cache = (StaticCache(config=llm.config, max_cache_len=s + max_new) if static
             else DynamicCache(config=llm.config))
    out = llm(inputs_embeds=x, attention_mask=None if full_mask is None else full_mask[:, :s],
              position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    del out
    pos = positions[:, -1:]
    unfinished = torch.ones(b, dtype=torch.bool, device=x.device)
    alive = torch.zeros((), dtype=torch.long, device=x.device)  # steps after which some row was still going
    tokens = []
    # a host sync per token is free on CPU; on accelerators look at the stop condition every few tokens
    check_every = 1 if x.device.type == "cpu" else 8
    for t in range(max_new):
        if t < min_new:
            logits.index_fill_(1, eos_ids, -math.inf)
        nxt = logits.argmax(-1)
        nxt = torch.where(unfinished, nxt, pad)
        tokens.append(nxt)
        unfinished &= ~(nxt[:, None] == eos_ids[None, :]).any(-1)  # torch.isin falls back to CPU on NPU
        if loop_guard is not None:
            repeats, max_ngram = loop_guard
            unfinished &= ~looping_rows(torch.stack(tokens[-repeats * max_ngram:], dim=1), repeats, max_ngram)
        alive += unfinished.any()
        if t == max_new - 1 or ((t + 1) % check_every == 0 and not bool(unfinished.any())):
            break
        pos = pos + 1
        hidden = llm.model(input_ids=nxt[:, None], position_ids=pos, past_key_values=cache, use_cache=True,
                           attention_mask=None if full_mask is None else full_mask[:, :s + t + 1])
        logits = llm.lm_head(hidden.last_hidden_state[:, -1]).float()
    # generate() stops at the step that ends the last row; the loop may have looked a few steps later
    return torch.stack(tokens, dim=1)[:, :int(alive) + 1]


# GenerationConfig fields the lean greedy loop implements (or that do not affect greedy decoding's tokens)
_FAST_GREEDY_FIELDS = {"eos_token_id", "pad_token_id", "bos_token_id", "max_new_tokens", "min_new_tokens",
                       "do_sample", "num_beams", "length_penalty", "early_stopping", "temperature", "top_k", "top_p",
                       "use_cache", "cache_implementation", "transformers_version", "disable_compile",
                       "num_return_sequences", "min_length", "max_length"}


def hf_compiles_decode(gc, device: torch.device) -> str:
    """Non-empty when transformers' ``generate`` would ``torch.compile`` the decode step (a static cache on
    cuda/xpu, or ``compile_config._compile_all_devices``; not with ``disable_compile``): the same criteria as
    ``generate``'s auto-compilation. ``engine="auto"`` then leaves decoding to ``generate``, whose compiled step
    (CUDA graphs under ``mode="reduce-overhead"``) beats an eager loop on GPUs; the lean loop stays eager. On
    CPU a compiled step was measured at most ~20 % faster per token after 15-40 s of compilation, so it is off."""
    if gc.cache_implementation != "static" or gc.disable_compile:
        return ""
    every_device = bool(gc.compile_config is not None and getattr(gc.compile_config, "_compile_all_devices", None))
    if device.type in ("cuda", "xpu") or every_device:
        return f"static cache on {device.type}: transformers compiles the decode step"
    return ""


def fast_greedy_unsupported(gc) -> str:
    """Why ``gc`` needs transformers' ``generate`` (``""`` when :meth:`greedy_decode` computes it exactly)."""
    d = gc.to_diff_dict()
    other = sorted(k for k in d if k not in _FAST_GREEDY_FIELDS and not k.startswith("_"))
    if other:
        return f"fields {other}"
    if gc.do_sample or (gc.num_beams or 1) != 1:
        return "sampling / beam search"
    if (gc.num_return_sequences or 1) != 1:
        return "num_return_sequences != 1"
    if gc.max_new_tokens is None:
        return "max_new_tokens is not set"
    if gc.min_length:
        return "min_length (use min_new_tokens)"
    if gc.cache_implementation not in (None, "dynamic", "static"):
        return f"cache_implementation={gc.cache_implementation!r}"
    if gc.use_cache is False:
        return "use_cache=False"
    return ""
