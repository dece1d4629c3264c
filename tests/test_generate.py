"""JAX greedy decoding with a KV cache equals argmax decoding with full forward passes (no cache)."""

import numpy as np
import pytest
from flax import nnx

from osum_jax.models import OSUM
from osum_jax.models.generate import greedy_decode
from tests.helpers import tiny_model_config


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    feats_lengths = np.array([96, 57, 20])
    prompt_lengths = np.array([4, 2, 3])
    prompt = np.where(np.arange(4)[None] < prompt_lengths[:, None], rng.integers(0, 512, (3, 4)), -1)
    return dict(feats=rng.standard_normal((3, 96, 80)).astype(np.float32), feats_lengths=feats_lengths,
                prompt=prompt, prompt_lengths=prompt_lengths)


def _reference(model, batch, n, eos):
    """Decode one utterance at a time by re-running the full model on the growing target (no cache)."""
    out = []
    forward = nnx.jit(lambda m, x: m(x)["logits"])
    for b in range(len(batch["feats_lengths"])):
        one = dict(feats=batch["feats"][b:b + 1, :batch["feats_lengths"][b]],
                   feats_lengths=batch["feats_lengths"][b:b + 1],
                   prompt=batch["prompt"][b:b + 1, :batch["prompt_lengths"][b]],
                   prompt_lengths=batch["prompt_lengths"][b:b + 1])
        toks = []
        for _ in range(n):
            # fixed target width n (one compilation); the logits at len(toks) predict the next token
            tgt = np.array([toks + [0] + [-100] * (n - len(toks) - 1)])
            logits = forward(model, dict(one, target=tgt, target_lengths=np.array([len(toks) + 1])))
            nxt = int(np.argmax(np.asarray(logits[0, len(toks)])))
            toks.append(nxt)
            if nxt == eos:
                break
        out.append(toks)
    return out


@pytest.mark.slow
def test_cached_greedy_equals_full_forward():
    model = OSUM(tiny_model_config(), rngs=nnx.Rngs(3))
    batch = _batch()
    n = 6
    decode = nnx.jit(greedy_decode, static_argnames=("max_new_tokens",))
    tokens, lengths = decode(model, batch, max_new_tokens=n, eos_id=-5)  # -5 is never emitted: full length
    ref = _reference(model, batch, n, eos=-5)
    assert np.asarray(tokens).tolist() == ref and np.asarray(lengths).tolist() == [n] * 3
    # now declare a token that row 1 emits at step 2 to be the end of text: rows stop at its first occurrence
    eos = ref[1][2]
    tokens, lengths = decode(model, batch, max_new_tokens=n, eos_id=eos)
    for b, r in enumerate(ref):
        stop = r.index(eos) if eos in r else n
        assert int(lengths[b]) == stop
        assert np.asarray(tokens[b]).tolist() == r[:stop] + [eos] * (n - stop)
