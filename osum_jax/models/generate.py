"""Batched greedy and beam-search decoding in JAX with a KV cache and static shapes (osum-decode, train-time
evaluation, parity checks).

::

    prefix = [prompt][bos speech eos]               (holes masked, positions = cumsum(valid) - 1)
    prefill: run the prefix into a cache of S0 + max_new_tokens slots; first scores = logits at eos
    step i:  write token i at slot S0 + i with position n_valid + i; attend to valid slots <= S0 + i

Everything has a static shape given (batch shape, ``max_new_tokens``, ``num_beams``), so one compilation per
batch shape. Rows that emitted ``eos_id`` keep emitting ``eos_id``. Both return ``tokens [B, max_new_tokens]`` and
``lengths [B]`` (tokens before the first eos). ``stop_early``: the loop ends as soon as every row has ended (a
``while`` loop; the tokens are the same as without it, where the loop always runs ``max_new_tokens`` steps and
compiles with a known trip count, which the compilers' cost models need).

:func:`beam_search` is transformers' beam search (``GenerationMixin._beam_search``, 5.x) step for step: the
top ``2 * num_beams`` continuations of all beams by summed log-probability, those ending in eos (or at
``max_new_tokens``) among the top ``num_beams`` join the finished hypotheses with score ``sum / length **
length_penalty`` (the length counts the eos), the best ``num_beams`` unfinished continue, and a row stops taking
hypotheses once its best running beam cannot beat its worst finished one (``early_stopping=False``, transformers'
default; ``True``: once ``num_beams`` are finished). The result is the best finished hypothesis.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .osum import OSUM

_NEG = -1.0e9  # transformers' "impossible" score, added rather than set (the same float32 arithmetic)


def _prefill(model: OSUM, batch: Mapping[str, Any], max_new_tokens: int, repeat: int = 1):
    """Encode, assemble and prefill; rows repeated ``repeat`` times (beams). Returns the first logits ``[R, V]``
    and the loop's state pieces."""
    speech, speech_lengths = model.encode_speech(jnp.asarray(batch["feats"]), jnp.asarray(batch["feats_lengths"]))
    seq = model.assemble_prefix(batch, speech, speech_lengths)
    x, valid, positions = seq["inputs_embeds"], seq["valid"], seq["positions"]
    if repeat > 1:
        x, valid, positions = (jnp.repeat(a, repeat, axis=0) for a in (x, valid, positions))
    r, s0, _ = x.shape
    s_max = s0 + max_new_tokens
    llm = model.llm
    cache = llm.init_cache(r, s_max)
    key_valid = jnp.concatenate([valid, jnp.zeros((r, max_new_tokens), bool)], axis=1)
    slots = jnp.arange(s_max)
    prefill_mask = (slots[None, None, None, :] <= jnp.arange(s0)[None, None, :, None]) & key_valid[:, None, None, :]
    hidden, cache = llm.forward_cached(x, prefill_mask, positions, cache, 0)
    logits = llm.logits(hidden[:, -1])
    next_pos = valid.sum(axis=1).astype(jnp.int32)
    return logits, cache, key_valid, next_pos, s0


def _step(llm, tok, cache, key_valid, pos, s0, i):
    """Feed ``tok [R]`` at slot ``s0 + i``: the next logits ``[R, V]`` and the cache."""
    w = s0 + i
    key_valid = key_valid.at[:, w].set(True)
    slots = jnp.arange(key_valid.shape[1])
    mask = ((slots <= w)[None, :] & key_valid)[:, None, None, :]
    h, cache = llm.forward_cached(llm.embed(tok[:, None]), mask, (pos + i)[:, None], cache, w)
    return llm.logits(h[:, 0]), cache, key_valid


def _loop(cond, body, init, max_new_tokens: int, stop_early: bool):
    """``body(i, carry)`` for ``i < max_new_tokens`` (and, with ``stop_early``, while ``cond(carry)``)."""
    if not stop_early:
        return jax.lax.fori_loop(0, max_new_tokens, body, init)

    def c(ic):
        return (ic[0] < max_new_tokens) & cond(ic[1])

    return jax.lax.while_loop(c, lambda ic: (ic[0] + 1, body(ic[0], ic[1])), (jnp.int32(0), init))[1]


def _lengths(tokens: jax.Array, eos_id: int) -> jax.Array:
    is_eos = tokens == eos_id
    return jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), tokens.shape[1]).astype(jnp.int32)


def greedy_decode(model: OSUM, batch: Mapping[str, Any], max_new_tokens: int, eos_id: int,
                  stop_early: bool = False) -> tuple[jax.Array, jax.Array]:
    """Greedy tokens ``[B, max_new_tokens]`` (eos-filled after the end) and lengths ``[B]`` (eos excluded)."""
    logits, cache, key_valid, pos, s0 = _prefill(model, batch, max_new_tokens)
    b = logits.shape[0]
    graphdef, state = nnx.split(model.llm)  # the loop body rebuilds the module at its own trace level
    tokens = jnp.full((b, max_new_tokens), eos_id, jnp.int32)

    def body(i, carry):
        state, logits, cache, key_valid, tokens, done = carry
        tok = jnp.where(done, eos_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        done = done | (tok == eos_id)
        logits, cache, key_valid = _step(nnx.merge(graphdef, state), tok, cache, key_valid, pos, s0, i)
        return state, logits, cache, key_valid, tokens, done

    init = (state, logits, cache, key_valid, tokens, jnp.zeros((b,), bool))
    tokens = _loop(lambda c: ~c[-1].all(), body, init, max_new_tokens, stop_early)[4]
    return tokens, _lengths(tokens, eos_id)


def _reorder_beams(cache: jax.Array, parent: jax.Array) -> jax.Array:
    """``cache [L, B * K, ...]`` with beam ``j`` of each row taking beam ``parent[b, j]``'s entries: ``K`` selects
    (an elementwise fusion; a gather along the batch axis was 43 % of the TPU cost model's cycles of a beam step)."""
    b, k = parent.shape
    c = cache.reshape(cache.shape[0], b, k, *cache.shape[2:])
    ones = [1] * (c.ndim - 3)
    beams = []
    for j in range(k):  # no operand is broadcast along the beams (a broadcast there was not fused on TPU)
        out = c[:, :, 0]
        for i in range(1, k):
            out = jnp.where((parent[:, j] == i).reshape(1, b, *ones), c[:, :, i], out)
        beams.append(out)
    return jnp.stack(beams, axis=2).reshape(cache.shape)


def beam_search(model: OSUM, batch: Mapping[str, Any], max_new_tokens: int, eos_id: int, num_beams: int,
                length_penalty: float = 1.0, early_stopping: bool = False,
                stop_early: bool = False) -> tuple[jax.Array, jax.Array]:
    """The best beam's tokens ``[B, max_new_tokens]`` (eos-filled after its end) and lengths ``[B]``."""
    k, n = num_beams, max_new_tokens
    logits, cache, key_valid, pos, s0 = _prefill(model, batch, n, repeat=k)
    b, v = logits.shape[0] // k, logits.shape[-1]
    graphdef, state = nnx.split(model.llm)
    keep = 2 * k  # transformers: max(2, 1 + number of eos ids) * num_beams
    top_mask = jnp.arange(keep) < k
    gather = jax.vmap(lambda a, idx: a[idx])  # per row: a [K, ...] at idx [K']

    def body(t, carry):
        (state, logits, cache, key_valid, running, run_scores, seqs, scores, finished, open_,
         all_hit) = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, v)
        acc = (logp + run_scores[:, :, None]).reshape(b, k * v)
        top_lp, top_idx = jax.lax.top_k(acc, keep)
        src, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        top_seq = gather(running, src)
        top_seq = jax.vmap(lambda s, tk: jax.lax.dynamic_update_slice(s, tk[:, None], (0, t)))(top_seq, tok)
        hits = (tok == eos_id) | (t + 1 >= n)
        # the best num_beams continuations that go on
        run_lp = top_lp + hits.astype(jnp.float32) * _NEG
        nxt = jax.lax.top_k(run_lp, k)[1]
        running, run_scores, parent = gather(top_seq, nxt), gather(run_lp, nxt), gather(src, nxt)
        # finished hypotheses: those among the top num_beams that hit eos / the length limit
        just = hits & top_mask[None, :]
        fin = top_lp / ((t + 1.0) ** length_penalty)
        if early_stopping is True:
            fin = fin + (finished.all(axis=1, keepdims=True)).astype(jnp.float32) * _NEG
        fin = fin + (~open_).astype(jnp.float32) * _NEG
        fin = fin + (~just).astype(jnp.float32) * _NEG
        m_seq = jnp.concatenate([seqs, top_seq], axis=1)
        m_scores = jnp.concatenate([scores, fin], axis=1)
        m_fin = jnp.concatenate([finished, just], axis=1)
        best = jax.lax.top_k(m_scores, k)[1]
        seqs, scores, finished = gather(m_seq, best), gather(m_scores, best), gather(m_fin, best)
        # can a running beam still beat the worst finished one? (early_stopping=False's heuristic)
        best_possible = run_scores[:, :1] / ((t + 1.0) ** length_penalty)
        worst = jnp.where(finished, scores.min(axis=1, keepdims=True), _NEG)
        open_ = open_ & (best_possible > worst).any(axis=-1, keepdims=True)
        all_hit = hits.all()
        cache = jax.tree.map(lambda c: _reorder_beams(c, parent), cache)
        logits, cache, key_valid = _step(nnx.merge(graphdef, state), running[:, :, t].reshape(-1), cache,
                                         key_valid, pos, s0, t)
        return (state, logits, cache, key_valid, running, run_scores, seqs, scores, finished, open_, all_hit)

    running = jnp.full((b, k, n), eos_id, jnp.int32)
    run_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG)
    init = (state, logits, cache, key_valid, running, run_scores, running, jnp.full((b, k), _NEG, jnp.float32),
            jnp.zeros((b, k), bool), jnp.ones((b, 1), bool), jnp.zeros((), bool))

    def going(c):
        finished, open_, all_hit = c[8], c[9], c[10]
        go = open_.any() & ~all_hit
        return go & ~finished.all() if early_stopping is True else go

    out = _loop(going, body, init, n, stop_early)
    tokens = out[6][:, 0]
    return tokens, _lengths(tokens, eos_id)
