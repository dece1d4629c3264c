"""Whisper speech encoder with variable-length inputs (OSUM's ``encoder``).

Forward, for log-mel features ``feats [B, T, n_mels]`` with ``lengths [B]`` (T <= 2 * max_source_positions)::

    x = GELU(conv1(feats))          # k3, stride 1, pad 1            [B, T, D]
    x = GELU(conv2(x))              # k3, stride 2, pad 1            [B, ceil(T/2), D]
    x = dropout(x + pe[:T1])        # fixed sinusoid table
    x = blocks(x, key_padding_mask) # pre-LN, GELU FFN, k without bias
    x = LN(x)

Unlike Hugging Face's ``WhisperEncoder`` (fixed 3000 frames, no mask) it takes any length up to 3000 frames
with a key-padding mask, as OSUM does. Valid output length is ``ceil(L / 2)``.

Batch-padding parity (OSUM quirk, reference §2.1): OSUM derives the subsampled mask from the *padded* batch
length and feeds the conv output of padding frames into the last valid frame, so an utterance's result depends
on what it is batched with. Here padded frames are zeroed before each convolution and the valid length is
``ceil(L / 2)`` per utterance, so every utterance in a padded batch gets exactly the result it gets alone
(the single-utterance behaviour of OSUM, which is how its checkpoints are used at inference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import EncoderConfig
from .attention import SequenceMask, padding_mask, sequence_multiple
from .encoder_block import EncoderBlock
from .layers import Buffer, Conv1d, LayerNorm, as_dtype, param, split_key
from .ops import Ops
from .positions import whisper_sinusoids
from .stack import create_stacked, run_stacked


def whisper_output_lengths(lengths: jax.Array) -> jax.Array:
    """Valid encoder frames for ``lengths`` mel frames: ``ceil(L / 2)``."""
    return (lengths + 1) // 2


class WhisperEncoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype="float32", param_dtype="float32", remat: str = "none",
                 ops: Ops | None = None, rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        dt, pdt = as_dtype(dtype), as_dtype(param_dtype)
        d = cfg.d_model
        kw = dict(dtype=dt, param_dtype=pdt)
        self.conv1 = Conv1d(cfg.num_mel_bins, d, 3, padding=(1, 1), axes=("conv_width", "mel", "embed"),
                            rngs=rngs, **kw)
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=(1, 1), axes=("conv_width", "embed_in", "embed"),
                            rngs=rngs, **kw)
        self.embed_positions = param(
            jnp.asarray(whisper_sinusoids(cfg.max_source_positions, d), pdt), ("positions", "embed"), Buffer)
        self.layers = create_stacked(
            lambda r: EncoderBlock(d, cfg.num_heads, cfg.ffn_dim, act="gelu", key_bias=cfg.key_bias,
                                   eps=cfg.layer_norm_eps, dropout_rate=cfg.dropout, ops=ops, rngs=r, **kw),
            cfg.num_layers, rngs)
        self.layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.cfg = cfg
        self.dtype = dt
        self.remat = remat
        self.ops = ops

    def __call__(self, feats: jax.Array, lengths: jax.Array,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``feats [B, T, n_mels]``, ``lengths [B]`` -> hidden ``[B, ceil(T/2), D]``, lengths ``[B]``."""
        b, t, _ = feats.shape
        if t > 2 * self.cfg.max_source_positions:
            raise ValueError(
                f"encoder input has {t} frames; at most {2 * self.cfg.max_source_positions} "
                f"({self.cfg.max_source_positions * 2 / 100:.0f} s) are supported")
        k_pos, k_layers = split_key(dropout_key, 2)
        valid = padding_mask(lengths, t)[..., None]
        x = jnp.where(valid, feats, 0).astype(self.dtype)
        x = self.ops.gelu(self.conv1(x))
        x = jnp.where(valid, x, 0)  # the stride-2 conv must not see activations of padding frames
        x = self.ops.gelu(self.conv2(x))
        t1 = x.shape[1]
        out_lengths = whisper_output_lengths(lengths)
        x = x + self.embed_positions[:t1].astype(self.dtype)
        x = self.ops.dropout(x, self.cfg.positional_dropout, k_pos)
        head_dim = self.cfg.d_model // self.cfg.num_heads
        pad = -t1 % sequence_multiple(self.ops.attention_impl, self.dtype, head_dim, t1, self.ops.platform)
        if pad:  # once for all layers (padding frames are masked keys and never reach a valid frame)
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        mask = SequenceMask(padding_mask(out_lengths, t1 + pad), prefix=True)
        x = run_stacked(self.layers, x, lambda layer, h, k: layer(h, mask, k), self.cfg.num_layers,
                        dropout_key=k_layers, remat=self.remat, ops=self.ops)
        return self.layer_norm(x[:, :t1]), out_lengths
