"""Position encodings: Whisper's sinusoid table, ESPnet's interleaved table (OSUM adapter), and Qwen2 RoPE."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .ops import Ops, rotate_half


def whisper_sinusoids(length: int, channels: int) -> np.ndarray:
    """OpenAI Whisper's table ``[length, channels]``: ``concat[sin, cos]`` with log-spaced timescales.

    Identical to wenet's ``WhisperPositionalEncoding`` (OSUM ``encoder.embed.pos_enc.pe``) and HF's
    ``embed_positions``. Computed in float64, stored float32, as OpenAI does.
    """
    if channels % 2:
        raise ValueError("channels must be even")
    inc = np.log(10000.0) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def espnet_sinusoids(length: int, channels: int) -> np.ndarray:
    """ESPnet/wenet ``PositionalEncoding`` table ``[length, channels]``: sin at even, cos at odd channels.

    Computed in float32 like the torch original (``speech_transformer.embed.pos_enc.pe`` in OSUM).
    """
    pos = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, channels, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / channels)))
    pe = np.zeros((length, channels), np.float32)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div)
    return pe


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for ``positions [B, S]`` -> cos, sin ``[B, S, head_dim]`` (float32, HF half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, heads_major: bool = False,
               ops: Ops | None = None) -> jax.Array:
    """Rotate ``x [B, S, N, H]`` (``[B, N, S, H]`` if ``heads_major``) by ``cos/sin [B, S, H]`` (``rotate_half``
    convention of HF Qwen2/LLaMA; ``ops.rotate_half``, the plain form without ``ops``)."""
    rotated = rotate_half(x) if ops is None else ops.rotate_half(x, heads_major=heads_major)
    at = 1 if heads_major else 2
    cos = jnp.expand_dims(cos, at).astype(x.dtype)
    sin = jnp.expand_dims(sin, at).astype(x.dtype)
    return x * cos + rotated * sin
