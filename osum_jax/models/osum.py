"""The OSUM composite: Whisper encoder -> adapter -> ``[prompt][bos speech eos][target]`` -> Qwen2 (+LoRA).

Batch contract (OSUM's own key names; the torch runtime implements the same one)::

    feats          [B, T, n_mels] float    log-mel, padded with anything (masked)
    feats_lengths  [B] int                 valid frames, 1 <= L <= T <= 3000
    prompt         [B, P] int              instruction ids, padding -1 (optional key; absent = no prompt)
    prompt_lengths [B] int
    target         [B, L] int              label ids incl. the final end-of-text id, padding -100
    target_lengths [B] int

``model(batch)`` returns ``{"loss": scalar, "logits": [B, L, V] float32, "num_tokens": scalar}`` where
``logits[b, i]`` is the distribution that predicts ``target[b, i]`` and ``loss`` is the mean cross-entropy over
the valid target tokens of the whole batch (HF causal-LM loss, as OSUM trains).

Sequence layout (as OSUM): the padded blocks are concatenated, so padding leaves holes between the blocks::

    [ prompt (P) | bos | speech (T3) | eos | target (L) ]

Holes are masked from attention and position ids are ``cumsum(valid) - 1``, so each utterance is computed
exactly as if its valid tokens were packed. Because every block has a static size, the eos sits at index
``P + T3 + 1`` for every row and the predictions for the target are ``hidden[:, P + T3 + 1 : P + T3 + 1 + L]``;
the LM head runs on those ``L`` positions only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from osum_torch_infer import contract
from osum_torch_infer.contract import BATCH_KEYS

from ..config import ModelConfig
from .adapter import Adapter
from .attention import padding_mask
from .layers import as_dtype, param, split_key
from .ops import Ops
from .qwen2 import Qwen2
from .whisper import WhisperEncoder


class OSUM(nnx.Module):
    """``ops``: the backend choices (``ops.Ops``), default ``Ops.from_config(cfg)`` (``cfg``'s settings for JAX's
    default backend, no mesh); the trainer passes the ones of its mesh (``TrainProgram``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, ops: Ops | None = None):
        ops = ops if ops is not None else Ops.from_config(cfg)
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat_policy, ops=ops)
        self.encoder = WhisperEncoder(cfg.encoder, rngs=rngs, **common)
        self.adapter = Adapter(cfg.encoder.d_model, cfg.llm.hidden_size, cfg.adapter, rngs=rngs, **common)
        pdt = as_dtype(cfg.param_dtype)
        # OSUM's speech_token_emded: only rows speech_token_num (bos) and speech_token_num + 1 (eos) are used.
        self.speech_embed = param(
            cfg.llm.initializer_range
            * jax.random.normal(rngs.params(), (cfg.speech_token_num + 2, cfg.llm.hidden_size), pdt),
            ("speech_vocab", "embed"))
        self.llm = Qwen2(cfg.llm, cfg.lora, rngs=rngs, **common)
        self.cfg = cfg
        self.dtype = as_dtype(cfg.dtype)
        self.ops = ops

    # -- speech -------------------------------------------------------------------------------------------------

    def encode_speech(self, feats: jax.Array, feats_lengths: jax.Array,
                      dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``feats [B, T, M]`` -> speech embeddings ``[B, T3, D_llm]`` and valid lengths ``ceil(L / 8)``."""
        k_enc, k_ad = split_key(dropout_key, 2)
        h, lengths = self.encoder(feats, feats_lengths, k_enc)
        return self.adapter(h, lengths, k_ad)

    def bos_eos(self) -> tuple[jax.Array, jax.Array]:
        n = self.cfg.speech_token_num
        table = self.speech_embed[...]
        return table[n].astype(self.dtype), table[n + 1].astype(self.dtype)

    # -- sequence assembly ----------------------------------------------------------------------------------------

    def assemble(self, batch: Mapping[str, Any], speech: jax.Array, speech_lengths: jax.Array) -> dict[str, Any]:
        """Build ``[prompt][bos speech eos][target]``: embeddings ``[B, S, D]``, ``valid [B, S]``, ``positions``.

        Also returns ``target_start`` (static int): the sequence index whose output predicts ``target[:, 0]``.
        """
        return self._assemble(batch, speech, speech_lengths, with_target=True)

    def assemble_prefix(self, batch: Mapping[str, Any], speech: jax.Array,
                        speech_lengths: jax.Array) -> dict[str, Any]:
        """``[prompt][bos speech eos]`` only (generation); ``target_start`` is the eos index ``S - 1``."""
        return self._assemble(batch, speech, speech_lengths, with_target=False)

    def _assemble(self, batch, speech, speech_lengths, with_target: bool) -> dict[str, Any]:
        b, t3, d = speech.shape
        parts, valids = [], []
        prompt = batch.get("prompt")
        p = 0 if prompt is None else prompt.shape[1]
        if p:
            pv = padding_mask(jnp.asarray(batch["prompt_lengths"]), p)
            parts.append(self.llm.embed(jnp.where(pv, prompt, 0)))
            valids.append(pv)
        bos, eos = self.bos_eos()
        ones = jnp.ones((b, 1), bool)
        parts += [jnp.broadcast_to(bos, (b, 1, d)), speech.astype(self.dtype), jnp.broadcast_to(eos, (b, 1, d))]
        valids += [ones, padding_mask(speech_lengths, t3), ones]
        if with_target:
            target = jnp.asarray(batch["target"])
            tv = padding_mask(jnp.asarray(batch["target_lengths"]), target.shape[1])
            parts.append(self.llm.embed(jnp.where(tv & (target >= 0), target, 0)))
            valids.append(tv)
        valid = jnp.concatenate(valids, axis=1)
        positions = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 1)
        return {
            "inputs_embeds": jnp.concatenate(parts, axis=1),
            "valid": valid,
            "positions": positions,
            "target_start": p + t3 + 1,
        }

    # -- forward --------------------------------------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, Any], dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
        check_batch(batch, self.cfg)
        k_speech, k_llm = split_key(dropout_key, 2)
        speech, speech_lengths = self.encode_speech(jnp.asarray(batch["feats"]),
                                                    jnp.asarray(batch["feats_lengths"]), k_speech)
        seq = self.assemble(batch, speech, speech_lengths)
        hidden = self.llm(seq["inputs_embeds"], seq["valid"], seq["positions"], k_llm)
        target = jnp.asarray(batch["target"])
        length = target.shape[1]
        start = seq["target_start"]
        logits = self.ops.constrain(self.llm.logits(hidden[:, start:start + length]),
                                    ("act_batch", "act_length", "act_vocab"))
        loss_mask = padding_mask(jnp.asarray(batch["target_lengths"]), length) & (target >= 0)
        loss, n = masked_cross_entropy(logits, target, loss_mask)
        return {"loss": loss, "logits": logits, "num_tokens": n}


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy over ``mask`` (float32); returns ``(loss, number_of_tokens)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    n = mask.sum().astype(jnp.float32)
    return jnp.where(mask, nll, 0.0).sum() / jnp.maximum(n, 1.0), n


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_batch(batch: Mapping[str, Any], cfg: ModelConfig) -> None:
    """Validate a batch against the contract (:func:`osum_torch_infer.contract.check_batch`); raises
    ``ValueError`` naming the offending key.

    Shapes are always checked; values (lengths, token ids) only when the arrays are concrete (outside ``jit``),
    so call it on host batches before the first step to catch bad data early.
    """
    contract.check_batch(batch, num_mel_bins=cfg.encoder.num_mel_bins, vocab_size=cfg.llm.vocab_size,
                         max_frames=2 * cfg.encoder.max_source_positions,
                         values=all(_concrete(batch[k]) for k in batch if k in BATCH_KEYS))
