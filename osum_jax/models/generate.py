"""Batched greedy decoding in JAX with a KV cache and static shapes (train-time evaluation, parity checks).

::

    prefix = [prompt][bos speech eos]               (holes masked, positions = cumsum(valid) - 1)
    prefill: run the prefix into a cache of S0 + max_new_tokens slots; first token = argmax at eos
    step i:  write token i at slot S0 + i with position n_valid + i; attend to valid slots <= S0 + i

Everything has a static shape given (batch shape, ``max_new_tokens``), so one compilation per batch shape.
Rows that emitted ``eos_id`` keep emitting ``eos_id``. Returns ``tokens [B, max_new_tokens]`` and ``lengths [B]``
(tokens before the first eos).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .osum import OSUM


def greedy_decode(model: OSUM, batch: Mapping[str, Any], max_new_tokens: int,
                  eos_id: int) -> tuple[jax.Array, jax.Array]:
    """Greedy tokens ``[B, max_new_tokens]`` (eos-filled after the end) and lengths ``[B]`` (eos excluded)."""
    speech, speech_lengths = model.encode_speech(jnp.asarray(batch["feats"]), jnp.asarray(batch["feats_lengths"]))
    seq = model.assemble_prefix(batch, speech, speech_lengths)
    x, valid, positions = seq["inputs_embeds"], seq["valid"], seq["positions"]
    b, s0, _ = x.shape
    s_max = s0 + max_new_tokens
    llm = model.llm
    cache = llm.init_cache(b, s_max)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    slots = jnp.arange(s_max)
    prefill_mask = (slots[None, None, None, :] <= jnp.arange(s0)[None, None, :, None]) & key_valid[:, None, None, :]
    hidden, cache = llm.forward_cached(x, prefill_mask, positions, cache, 0)
    first = jnp.argmax(llm.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)
    next_pos = valid.sum(axis=1).astype(jnp.int32)
    graphdef, state = nnx.split(llm)  # the loop body rebuilds the module at its own trace level

    def step(carry, i):
        state, tok, cache, key_valid, pos, done = carry
        llm = nnx.merge(graphdef, state)
        done = done | (tok == eos_id)
        w = s0 + i
        key_valid = key_valid.at[:, w].set(True)
        mask = ((slots <= w)[None, :] & key_valid)[:, None, None, :]
        h, cache = llm.forward_cached(llm.embed(tok[:, None]), mask, pos[:, None], cache, w)
        nxt = jnp.argmax(llm.logits(h[:, 0]), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, eos_id, nxt)
        return (state, nxt, cache, key_valid, pos + 1, done), jnp.where(done, eos_id, tok)

    init = (state, first, cache, key_valid, next_pos, jnp.zeros((b,), bool))
    _, tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    tokens = tokens.T
    is_eos = tokens == eos_id
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), max_new_tokens).astype(jnp.int32)
    return tokens, lengths
