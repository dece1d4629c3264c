"""Adapter: length/mask rules and the block stack against an independent torch formulation.

The torch side is written from OSUM's description with stock torch modules (``nn.Conv1d`` after a causal
``F.pad``, ``nn.TransformerEncoderLayer(norm_first=True, activation="relu")``, ESPnet sinusoids x sqrt(d)).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from osum_jax.config import AdapterConfig
from osum_jax.checkpoint import load_flat
from osum_jax.models import Adapter, conv_stack_lengths
from tests.helpers import rel_err, to_np

D, D_LLM, HEADS, FFN, LAYERS = 32, 56, 4, 80, 2


class TorchAdapter(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(D, D, 3, stride=s) for s in (1, 2, 2)])
        self.inp = nn.Linear(D, D)
        self.inp_ln = nn.LayerNorm(D)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, activation="relu", norm_first=True,
                                       batch_first=True) for _ in range(LAYERS)])
        self.after_norm = nn.LayerNorm(D)
        self.proj = nn.Linear(D, D_LLM)
        pos = torch.arange(512, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, D, 2, dtype=torch.float32) * -(math.log(10000.0) / D))
        pe = torch.zeros(512, D)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)

    def forward(self, x, mask):  # x [B, T, D], mask [B, T] bool (True = valid)
        x = x.transpose(1, 2)
        for conv in self.convs:
            x = F.gelu(conv(F.pad(x, (2, 0))))
        mask = mask[:, 0::2][:, 0::2]  # OSUM: x_mask[:, :, 0::2] after each stride-2 conv
        x = self.inp_ln(self.inp(x.transpose(1, 2)))
        x = x * math.sqrt(D) + self.pe[: x.shape[1]]
        for blk in self.blocks:
            x = blk(x, src_key_padding_mask=~mask)
        return self.proj(self.after_norm(x)), mask


def _torch_to_jax(t: TorchAdapter) -> dict[str, np.ndarray]:
    out = {}
    for i, conv in enumerate(t.convs):
        out[f"downsample.convs.{i}.kernel"] = to_np(conv.weight).transpose(2, 1, 0)
        out[f"downsample.convs.{i}.bias"] = to_np(conv.bias)
    out["transformer.input_proj.kernel"] = to_np(t.inp.weight).T
    out["transformer.input_proj.bias"] = to_np(t.inp.bias)
    out["transformer.input_norm.scale"] = to_np(t.inp_ln.weight)
    out["transformer.input_norm.bias"] = to_np(t.inp_ln.bias)
    out["transformer.pos_table"] = to_np(t.pe)
    per = {}
    for blk in t.blocks:
        q, k, v = to_np(blk.self_attn.in_proj_weight).reshape(3, D, D)
        qb, kb, vb = to_np(blk.self_attn.in_proj_bias).reshape(3, D)
        rows = {
            "self_attn.q_proj.kernel": q.T, "self_attn.q_proj.bias": qb,
            "self_attn.k_proj.kernel": k.T, "self_attn.k_proj.bias": kb,
            "self_attn.v_proj.kernel": v.T, "self_attn.v_proj.bias": vb,
            "self_attn.out_proj.kernel": to_np(blk.self_attn.out_proj.weight).T,
            "self_attn.out_proj.bias": to_np(blk.self_attn.out_proj.bias),
            "self_attn_layer_norm.scale": to_np(blk.norm1.weight), "self_attn_layer_norm.bias": to_np(blk.norm1.bias),
            "final_layer_norm.scale": to_np(blk.norm2.weight), "final_layer_norm.bias": to_np(blk.norm2.bias),
            "fc1.kernel": to_np(blk.linear1.weight).T, "fc1.bias": to_np(blk.linear1.bias),
            "fc2.kernel": to_np(blk.linear2.weight).T, "fc2.bias": to_np(blk.linear2.bias),
        }
        for name, arr in rows.items():
            per.setdefault(name, []).append(arr)
    out.update({f"transformer.layers.{n}": np.stack(a) for n, a in per.items()})
    out["transformer.layer_norm.scale"] = to_np(t.after_norm.weight)
    out["transformer.layer_norm.bias"] = to_np(t.after_norm.bias)
    out["proj.kernel"] = to_np(t.proj.weight).T
    out["proj.bias"] = to_np(t.proj.bias)
    return out


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    torch.backends.mha.set_fastpath_enabled(False)
    t = TorchAdapter().eval()
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    cfg = AdapterConfig(num_layers=LAYERS, num_heads=HEADS, ffn_dim=FFN, max_positions=512)
    ours = Adapter(D, D_LLM, cfg, rngs=nnx.Rngs(0))
    load_flat(ours, _torch_to_jax(t), source="torch adapter")
    return t, ours


def test_length_rule_matches_mask_slicing():
    """Every input length 1..69: the conv stack's length rule equals the torch mask slicing and ceil(length / 4)."""
    for length in range(1, 70):
        mask = np.ones(length, bool)
        got = int(conv_stack_lengths(np.array([length]), (1, 2, 2))[0])
        assert got == mask[0::2][0::2].sum(), f"length {length}: {got} != mask slicing {mask[0::2][0::2].sum()}"
        assert got == math.ceil(length / 4), f"length {length}: {got} != ceil(length / 4) = {math.ceil(length / 4)}"


def test_matches_torch_formulation_on_padded_batch(pair):
    t, ours = pair
    lengths = np.array([37, 29, 8, 1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 37, D)).astype(np.float32)
    mask = np.arange(37)[None] < lengths[:, None]
    with torch.no_grad():
        ref, ref_mask = t(torch.from_numpy(x), torch.from_numpy(mask))
    out, out_len = ours(x, lengths)
    assert out_len.tolist() == ref_mask.sum(1).tolist() == [10, 8, 2, 1]
    for b, n in enumerate(out_len.tolist()):
        assert rel_err(out[b, :n], ref[b, :n].numpy()) <= 1e-4


def test_padded_batch_equals_alone(pair):
    _, ours = pair
    lengths = np.array([50, 23, 6])
    x = np.random.default_rng(1).standard_normal((3, 50, D)).astype(np.float32)
    out, out_len = ours(x, lengths)
    for b, n in enumerate(lengths):
        alone, alone_len = ours(x[b:b + 1, :n], np.array([n]))
        assert int(alone_len[0]) == int(out_len[b])
        np.testing.assert_allclose(np.asarray(out[b, :int(out_len[b])]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
