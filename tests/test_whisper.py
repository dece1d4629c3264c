"""Whisper encoder parity with transformers.WhisperEncoder, and variable-length/padding behaviour."""

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from osum_jax.config import EncoderConfig
from osum_jax.convert.hf import whisper_encoder_from_hf
from osum_jax.checkpoint import load_flat
from osum_jax.models import WhisperEncoder, whisper_output_lengths
from tests.helpers import rel_err, state_to_np

D, LAYERS, HEADS, FFN = 48, 2, 4, 96


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = WhisperConfig(d_model=D, encoder_layers=LAYERS, encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                           num_mel_bins=80, max_source_positions=1500, dropout=0.0, activation_function="gelu")
    hf = HFWhisperEncoder(hf_cfg).eval()
    with torch.no_grad():  # random non-trivial LayerNorm/bias values so every parameter matters
        for name, p in hf.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    cfg = EncoderConfig(d_model=D, num_layers=LAYERS, num_heads=HEADS, ffn_dim=FFN)
    ours = WhisperEncoder(cfg, rngs=nnx.Rngs(0))
    load_flat(ours, whisper_encoder_from_hf(state_to_np(hf), LAYERS), source="hf whisper")
    return hf, ours


def test_matches_hf_on_3000_frames(pair):
    hf, ours = pair
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 3000, 80)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(feats).transpose(1, 2)).last_hidden_state.numpy()
    out, lengths = ours(feats, np.array([3000, 3000]))
    assert out.shape == ref.shape == (2, 1500, D)
    assert lengths.tolist() == [1500, 1500]
    assert rel_err(out, ref) <= 1e-4


def _hf_single(hf, feats: np.ndarray) -> np.ndarray:
    """HF's own submodules on one unpadded utterance of any length (what OSUM computes for batch size 1)."""
    with torch.no_grad():
        x = torch.from_numpy(feats)[None].transpose(1, 2)
        x = torch.nn.functional.gelu(hf.conv1(x))
        x = torch.nn.functional.gelu(hf.conv2(x)).transpose(1, 2)
        x = x + hf.embed_positions.weight[: x.shape[1]]
        for layer in hf.layers:
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x
        return hf.layer_norm(x)[0].numpy()


@pytest.mark.parametrize("length", [1, 2, 7, 160, 161, 999])
def test_variable_length_single_matches_hf_modules(pair, length):
    hf, ours = pair
    feats = np.random.default_rng(length).standard_normal((length, 80)).astype(np.float32)
    ref = _hf_single(hf, feats)
    out, out_len = ours(feats[None], np.array([length]))
    assert ref.shape[0] == out.shape[1] == int(out_len[0]) == -(-length // 2)
    assert rel_err(out[0], ref) <= 1e-4


@pytest.mark.parametrize("t_max", [301, 300])  # odd and even padded lengths (OSUM's parity quirk)
def test_padded_batch_equals_each_utterance_alone(pair, t_max):
    _, ours = pair
    lengths = np.array([t_max, 257, 120, 33])
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((4, t_max, 80)).astype(np.float32)
    garbage = rng.standard_normal(feats.shape).astype(np.float32) * 100  # padding content must not matter
    valid = np.arange(t_max)[None, :, None] < lengths[:, None, None]
    batch_out, batch_len = ours(np.where(valid, feats, garbage), lengths)
    assert batch_len.tolist() == [int(x) for x in whisper_output_lengths(lengths)]
    for b, n in enumerate(lengths):
        alone, alone_len = ours(feats[b:b + 1, :n], np.array([n]))
        k = int(alone_len[0])
        assert k == int(batch_len[b])
        np.testing.assert_allclose(np.asarray(batch_out[b, :k]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_rejects_more_than_3000_frames(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="at most 3000"):
        ours(np.zeros((1, 3001, 80), np.float32), np.array([3001]))
