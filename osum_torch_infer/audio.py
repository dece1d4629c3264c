"""OSUM's audio side in PyTorch: the Whisper-style encoder and OSUM's adapter (Hugging Face / package names).

Same numerics as the JAX model (``osum_jax.models``): padding frames are zeroed before each convolution and every
utterance's valid length is ``ceil(L / 2)`` after the encoder and ``ceil(L / 8)`` after the adapter, so an
utterance in a padded batch gets exactly its batch-size-1 result. LayerNorm runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .package import AdapterConfig, EncoderConfig


def layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32 whatever the compute dtype (as the JAX model)."""
    y = F.layer_norm(x.float(), module.normalized_shape, module.weight.float(), module.bias.float(), module.eps)
    return y.to(x.dtype)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B] -> [B, T]`` bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "relu": F.relu, "silu": F.silu}


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, key_bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=key_bias)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block (Whisper ``ResidualAttentionBlock`` == wenet ``normalize_before`` layer)."""

    def __init__(self, d: int, heads: int, ffn: int, act: str, key_bias: bool, eps: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = SelfAttention(d, heads, key_bias)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(layer_norm(self.self_attn_layer_norm, x), mask)
        return x + self.fc2(self.act(self.fc1(layer_norm(self.final_layer_norm, x))))


class WhisperEncoder(nn.Module):
    """``feats [B, T, M]``, ``lengths [B]`` -> ``[B, ceil(T/2), D]``, lengths ``ceil(L/2)`` (Hugging Face names)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, "gelu", cfg.key_bias,
                                                 cfg.layer_norm_eps) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.max_frames = 2 * cfg.max_source_positions

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = feats.shape[1]
        valid = padding_mask(lengths, t)[:, None, :]  # [B, 1, T]
        x = feats.transpose(1, 2).to(self.conv1.weight.dtype) * valid
        x = F.gelu(self.conv1(x)) * valid  # the stride-2 conv must not see activations of padding frames
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        t1 = x.shape[1]
        out_lengths = (lengths + 1) // 2
        x = x + self.embed_positions.weight[:t1].to(x.dtype)
        mask = padding_mask(out_lengths, t1)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return layer_norm(self.layer_norm, x), out_lengths


class Adapter(nn.Module):
    """OSUM's link: 3 causal convs + GELU, Linear + LN, x*sqrt(D) + ESPnet table, blocks, LN, Linear to the LLM."""

    def __init__(self, d: int, d_llm: int, cfg: AdapterConfig):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(d, d, cfg.conv_kernel, stride=s) for s in cfg.conv_strides)
        self.input_proj = nn.Linear(d, d)
        self.input_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.embed_positions = nn.Embedding(cfg.max_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.activation, True,
                                                 cfg.layer_norm_eps) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d_llm)
        self.kernel = cfg.conv_kernel
        self.strides = tuple(cfg.conv_strides)
        self.xscale = math.sqrt(d)
        self.max_positions = cfg.max_positions

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = h.transpose(1, 2)
        for conv, s in zip(self.convs, self.strides):
            x = F.gelu(conv(F.pad(x, (self.kernel - 1, 0))))  # causal: valid outputs never see right padding
            lengths = (lengths + s - 1) // s
        x = x.transpose(1, 2)
        t = x.shape[1]
        x = layer_norm(self.input_norm, self.input_proj(x))
        x = x * self.xscale + self.embed_positions.weight[:t].to(x.dtype)
        mask = padding_mask(lengths, t)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.proj(layer_norm(self.layer_norm, x)), lengths


class AudioTower(nn.Module):
    """Encoder + adapter + projection: ``feats [B, T, M]``, ``feats_lengths [B]`` -> ``[B, T3, D_llm]``, lengths.

    The unit exported to ONNX (``osum-infer export-onnx``)."""

    def __init__(self, encoder: WhisperEncoder, adapter: Adapter):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter

    def forward(self, feats: torch.Tensor, feats_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, lengths = self.encoder(feats, feats_lengths)
        return self.adapter(h, lengths)
