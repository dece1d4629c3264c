"""Qwen2 decoder parity with transformers.Qwen2ForCausalLM; LoRA parity with peft (non-zero B)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from osum_jax.config import LLMConfig, LoRAConfig
from osum_jax.convert.hf import qwen2_from_hf
from osum_jax.checkpoint import CheckpointMismatch, load_flat
from osum_jax.models import Qwen2, merge_lora_
from tests.helpers import rel_err, state_to_np

V, D, F, L, H, KV, HD = 160, 48, 112, 2, 6, 2, 8
OSUM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=HD, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _llm_cfg():
    return LLMConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=KV,
                     head_dim=HD, rope_theta=10000.0)


def _ours(hf_state, lora: LoRAConfig):
    model = Qwen2(_llm_cfg(), lora, rngs=nnx.Rngs(0))
    load_flat(model, qwen2_from_hf(hf_state, _llm_cfg(), lora if lora.rank else None), source="hf qwen2")
    return model


def _our_logits(model, ids, valid, positions):
    hidden = model(model.embed(ids), valid, positions)
    return np.asarray(model.logits(hidden))


def _hf_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        if positions is not None:
            kw["position_ids"] = torch.from_numpy(positions.astype(np.int64))
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)), **kw).logits.float().numpy()


@pytest.fixture(scope="module")
def base():
    hf = _hf_model()
    return hf, _ours(state_to_np(hf), LoRAConfig(rank=0))


def test_logits_match_hf(base):
    hf, ours = base
    ids = np.random.default_rng(0).integers(0, V, (3, 17))
    valid = np.ones(ids.shape, bool)
    pos = np.broadcast_to(np.arange(17), ids.shape)
    assert rel_err(_our_logits(ours, ids, valid, pos), _hf_logits(hf, ids)) <= 1e-4


def test_right_padded_batch_with_mask(base):
    hf, ours = base
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, 20))
    lengths = np.array([20, 13, 5])
    mask = np.arange(20)[None, :] < lengths[:, None]
    pos = np.where(mask, np.cumsum(mask, 1) - 1, 1)
    ref = _hf_logits(hf, ids, mask, pos)
    out = _our_logits(ours, np.where(mask, ids, 0), mask, pos)
    for b, n in enumerate(lengths):
        assert rel_err(out[b, :n], ref[b, :n]) <= 1e-4
        # and each row equals the row run alone
        alone = _hf_logits(hf, ids[b:b + 1, :n])
        assert rel_err(out[b, :n], alone[0]) <= 1e-4


def test_explicit_position_ids_with_hole(base):
    """A masked hole in the middle plus cumsum positions (OSUM's layout) == the packed sequence."""
    hf, ours = base
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (2, 16))
    mask = np.ones((2, 16), bool)
    mask[0, 5:9] = False
    mask[1, 2:3] = False
    pos = np.where(mask, np.cumsum(mask, 1) - 1, 1)
    ref = _hf_logits(hf, ids, mask, pos)
    out = _our_logits(ours, ids, mask, pos)
    assert rel_err(out[mask], ref[mask]) <= 1e-4
    packed = _hf_logits(hf, ids[0][mask[0]][None])
    assert rel_err(out[0][mask[0]], packed[0]) <= 1e-4
    # arbitrary (non-contiguous) position ids are honoured, not recomputed
    pos2 = np.broadcast_to(np.arange(16) * 3 + 7, (2, 16))
    ref2 = _hf_logits(hf, ids, None, pos2)
    assert rel_err(_our_logits(ours, ids, np.ones((2, 16), bool), pos2), ref2) <= 1e-4


@pytest.fixture(scope="module")
def lora_pair():
    hf = _hf_model(seed=3)
    peft_cfg = PeftLoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=OSUM_TARGETS,
                              task_type="CAUSAL_LM")
    pm = get_peft_model(hf, peft_cfg).eval()
    with torch.no_grad():  # non-zero B (peft initialises B = 0, which would hide mapping errors)
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    lora = LoRAConfig(rank=4, alpha=16.0, dropout=0.1, targets=tuple(OSUM_TARGETS))
    return pm, _ours(state_to_np(pm), lora)


def test_lora_logits_match_peft(lora_pair):
    pm, ours = lora_pair
    ids = np.random.default_rng(4).integers(0, V, (2, 12))
    with torch.no_grad():
        ref = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    with torch.no_grad():
        with pm.disable_adapter():
            base_ref = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(ref, base_ref) > 1e-2  # the adapters really change the output
    out = _our_logits(ours, ids, np.ones(ids.shape, bool), np.broadcast_to(np.arange(12), ids.shape))
    assert rel_err(out, ref) <= 1e-4


def test_lora_merged_equals_unmerged(lora_pair):
    pm, ours = lora_pair
    ids = np.random.default_rng(5).integers(0, V, (2, 12))
    args = (ids, np.ones(ids.shape, bool), np.broadcast_to(np.arange(12), ids.shape))
    before = _our_logits(ours, *args)
    merged = nnx.clone(ours)
    assert merge_lora_(merged) == 6  # six target projections, each stacked over the layers
    assert all(not np.any(np.asarray(v[...])) for k, v in nnx.iter_graph(merged)
               if isinstance(v, nnx.LoRAParam) and k[-1] == "lora_b")
    after = _our_logits(merged, *args)
    assert rel_err(after, before) <= 1e-5
    # peft's own merge (on a copy, pm is shared) gives the same logits
    hf_merged = copy.deepcopy(pm).merge_and_unload().eval()
    assert rel_err(_hf_logits(hf_merged, ids), after) <= 1e-4


def test_lora_dropout_only_with_key(lora_pair):
    _, ours = lora_pair
    ids = np.random.default_rng(6).integers(0, V, (1, 10))
    x = ours.embed(ids)
    valid = np.ones(ids.shape, bool)
    pos = np.arange(10)[None]
    a = np.asarray(ours(x, valid, pos))
    b = np.asarray(ours(x, valid, pos))
    c = np.asarray(ours(x, valid, pos, dropout_key=jax.random.key(0)))
    d = np.asarray(ours(x, valid, pos, dropout_key=jax.random.key(0)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)
    assert np.abs(a - c).max() > 1e-4


def test_missing_and_unexpected_keys_are_named():
    hf = _hf_model()
    state = state_to_np(hf)
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.mlp.extra.weight"] = np.zeros(3)
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        qwen2_from_hf(state, _llm_cfg())
    assert "model.layers.0.mlp.extra.weight" in str(e.value)
    good = qwen2_from_hf(state_to_np(hf), _llm_cfg())
    good["layers.self_attn.q_proj.kernel"] = good["layers.self_attn.q_proj.kernel"][:, :, :-1]
    with pytest.raises(CheckpointMismatch, match=r"layers\.self_attn\.q_proj\.kernel: .*shape"):
        load_flat(Qwen2(_llm_cfg(), LoRAConfig(rank=0), rngs=nnx.Rngs(0)), good)


def test_dropout_masks_are_iid_bernoulli_at_the_configured_rate():
    """Dropout masks come from 16-bit fields, two per 32-bit threefry word (the two halves of the last axis):
    the drop rate is rate rounded to 2^-16, both halves and every position drop independently, and the kept
    values are scaled so that the expectation is unchanged."""
    from osum_jax.models.ops import dropout, keep_mask

    n = 512
    keep, keep_p = keep_mask(jax.random.key(3), 0.1, (256, n))
    keep = np.asarray(keep)
    assert keep_p == 1 - 6554 / 65536
    drop = 1 - keep.mean()
    assert abs(drop - 0.1) < 4 * np.sqrt(0.1 * 0.9 / keep.size)  # 4 sigma
    lo, hi = keep[:, : n // 2], keep[:, n // 2:]  # the two halves of one word each
    assert abs((~lo & ~hi).mean() - (1 - keep_p) ** 2) < 4 * np.sqrt(0.01 / lo.size)  # independent halves
    assert abs((~keep[:, :-1] & ~keep[:, 1:]).mean() - 0.01) < 4 * np.sqrt(0.01 / keep.size)  # neighbours too
    odd, _ = keep_mask(jax.random.key(3), 0.1, (64, 33))  # odd last axis: one word per element
    assert np.asarray(odd).shape == (64, 33)
    x = jnp.ones((256, n))
    y = np.asarray(dropout(x, 0.1, jax.random.key(4)))
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / keep_p)}
    assert abs(y.mean() - 1.0) < 4 * np.sqrt(0.1 / 0.9 / y.size)
