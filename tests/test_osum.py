"""The OSUM composite: sequence assembly, position ids, loss and the logits contract against HF Qwen2+peft."""

import copy

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from osum_jax.convert.hf import qwen2_from_hf
from osum_jax.checkpoint import load_flat
from osum_jax.models import OSUM
from tests.helpers import rel_err, state_to_np, tiny_model_config

CFG = tiny_model_config()


@pytest.fixture(scope="module")
def pair():
    llm = CFG.llm
    torch.manual_seed(0)
    hf_cfg = Qwen2Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                         intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                         num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                         head_dim=llm.resolved_head_dim, rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
                         tie_word_embeddings=False, attn_implementation="eager")
    hf = Qwen2ForCausalLM(hf_cfg)
    pm = get_peft_model(hf, PeftLoraConfig(r=CFG.lora.rank, lora_alpha=CFG.lora.alpha, lora_dropout=0.1,
                                           target_modules=list(CFG.lora.targets), task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model = OSUM(CFG, rngs=nnx.Rngs(0))
    load_flat(model.llm, qwen2_from_hf(state_to_np(pm), CFG.llm, CFG.lora), source="hf qwen2+peft")
    return pm, model


def make_batch(seed=0):
    """Padding in all three blocks: prompt (-1), speech (feats lengths) and target (-100)."""
    rng = np.random.default_rng(seed)
    v = CFG.llm.vocab_size
    feats_lengths = np.array([173, 100, 41])
    prompt_lengths = np.array([5, 3, 1])
    target_lengths = np.array([7, 4, 2])
    prompt = np.where(np.arange(5)[None] < prompt_lengths[:, None], rng.integers(0, v, (3, 5)), -1)
    target = np.where(np.arange(7)[None] < target_lengths[:, None], rng.integers(0, v, (3, 7)), -100)
    feats = rng.standard_normal((3, 173, 80)).astype(np.float32)
    return dict(feats=feats, feats_lengths=feats_lengths, prompt=prompt, prompt_lengths=prompt_lengths,
                target=target, target_lengths=target_lengths)


def row(batch, b):
    """Utterance b alone, unpadded."""
    return dict(
        feats=batch["feats"][b:b + 1, :batch["feats_lengths"][b]], feats_lengths=batch["feats_lengths"][b:b + 1],
        prompt=batch["prompt"][b:b + 1, :batch["prompt_lengths"][b]], prompt_lengths=batch["prompt_lengths"][b:b + 1],
        target=batch["target"][b:b + 1, :batch["target_lengths"][b]], target_lengths=batch["target_lengths"][b:b + 1])


def test_loss_and_logits_equal_hf_on_same_embeddings(pair):
    pm, model = pair
    batch = make_batch()
    out = model(batch)
    speech, speech_len = model.encode_speech(batch["feats"], batch["feats_lengths"])
    assert speech_len.tolist() == [22, 13, 6]  # ceil(T / 8)
    seq = model.assemble(batch, speech, speech_len)
    start, length = seq["target_start"], batch["target"].shape[1]
    labels = np.full(seq["valid"].shape, -100)
    labels[:, start + 1:start + 1 + length] = batch["target"]
    with torch.no_grad():
        ref = pm(inputs_embeds=torch.from_numpy(np.array(seq["inputs_embeds"])),
                 attention_mask=torch.from_numpy(np.asarray(seq["valid"]).astype(np.int64)),
                 position_ids=torch.from_numpy(np.asarray(seq["positions"]).astype(np.int64)),
                 labels=torch.from_numpy(labels))
    assert rel_err(out["loss"], ref.loss.item()) <= 1e-5
    assert float(out["num_tokens"]) == batch["target_lengths"].sum()
    hf_logits = ref.logits.numpy()[:, start:start + length]
    for b, n in enumerate(batch["target_lengths"]):
        assert rel_err(out["logits"][b, :n], hf_logits[b, :n]) <= 1e-4


def test_packed_sequence_built_by_hand_matches(pair):
    """[prompt][bos speech eos][target] packed without holes, fed to HF with contiguous positions."""
    pm, model = pair
    batch = make_batch(1)
    out = model(batch)
    speech, speech_len = model.encode_speech(batch["feats"], batch["feats_lengths"])
    table = pm.get_input_embeddings().weight.detach().numpy()
    speech_table = np.asarray(model.speech_embed[...])
    n_speech = CFG.speech_token_num
    for b in range(3):
        p, s, t = batch["prompt_lengths"][b], int(speech_len[b]), batch["target_lengths"][b]
        packed = np.concatenate([table[batch["prompt"][b, :p]], speech_table[n_speech:n_speech + 1],
                                 np.asarray(speech[b, :s]), speech_table[n_speech + 1:n_speech + 2],
                                 table[batch["target"][b, :t]]])
        with torch.no_grad():
            logits = pm(inputs_embeds=torch.from_numpy(packed[None])).logits[0].numpy()
        first = p + s + 1  # index of eos: predicts target[0]
        assert rel_err(out["logits"][b, :t], logits[first:first + t]) <= 1e-4


@pytest.mark.slow
def test_each_utterance_equals_itself_alone(pair):
    _, model = pair
    batch = make_batch(2)
    out = model(batch)
    losses, counts = [], []
    for b in range(3):
        alone = model(row(batch, b))
        n = batch["target_lengths"][b]
        assert rel_err(out["logits"][b, :n], alone["logits"][0]) <= 1e-5
        losses.append(float(alone["loss"]))
        counts.append(n)
    expected = np.dot(losses, counts) / np.sum(counts)  # mean over all target tokens of the batch
    assert rel_err(out["loss"], expected) <= 1e-5


def test_without_prompt_key(pair):
    _, model = pair
    batch = make_batch(3)
    no_prompt = {k: v for k, v in batch.items() if not k.startswith("prompt")}
    empty = dict(batch, prompt=np.zeros((3, 0), np.int64), prompt_lengths=np.zeros(3, np.int64))
    a, b = model(no_prompt), model(empty)
    np.testing.assert_allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_jit_grad_dropout_and_remat(pair):
    _, model = pair
    batch = make_batch(4)

    def loss_fn(m, key):
        return m(batch, key)["loss"]

    grad = nnx.jit(nnx.grad(loss_fn))
    g1 = grad(model, jax.random.key(0))
    g2 = grad(model, jax.random.key(0))
    g3 = grad(model, jax.random.key(1))
    l1 = jax.tree.leaves(g1)
    assert all(np.array_equal(a, b) for a, b in zip(l1, jax.tree.leaves(g2)))  # deterministic per key
    assert any(not np.allclose(a, b) for a, b in zip(l1, jax.tree.leaves(g3)))  # dropout is on with a key
    assert all(np.isfinite(np.asarray(x)).all() for x in l1)
    # per-layer remat changes memory, not numbers
    remat = copy.deepcopy(model)
    for _, node in nnx.iter_graph(remat):
        if hasattr(node, "remat"):
            node.remat = "full"
    g4 = nnx.jit(nnx.grad(loss_fn))(remat, jax.random.key(0))
    for a, b in zip(l1, jax.tree.leaves(g4)):  # recomputation reassociates float32 sums: compare per tensor
        a, b = np.asarray(a), np.asarray(b)  # (tensors of pure cancellation noise, ~1e-10, compare absolutely)
        assert rel_err(b, a) <= 1e-4 or np.abs(a - b).max() <= 1e-8


@pytest.mark.slow
def test_bfloat16_compute_is_close(pair):
    _, model = pair
    batch = make_batch(5)
    ref = model(batch)
    bf = OSUM(tiny_model_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf, nnx.state(model))
    out = bf(batch)
    assert out["logits"].dtype == np.float32
    assert abs(float(out["loss"]) - float(ref["loss"])) / float(ref["loss"]) < 2e-2


def test_bad_batches_are_named(pair):
    _, model = pair
    batch = make_batch()
    with pytest.raises(ValueError, match="missing key"):
        model({k: v for k, v in batch.items() if k != "target_lengths"})
    with pytest.raises(ValueError, match=r"batch\['feats'\] has shape"):
        model(dict(batch, feats=batch["feats"][..., :40]))
    with pytest.raises(ValueError, match=r"feats_lengths"):
        model(dict(batch, feats_lengths=np.array([174, 100, 41])))
    bad = batch["target"].copy()
    bad[1, 0] = CFG.llm.vocab_size
    with pytest.raises(ValueError, match=r"batch\['target'\]\[1, 0\]"):
        model(dict(batch, target=bad))
    with pytest.raises(ValueError, match="prompt_lengths"):
        model(dict(batch, prompt_lengths=np.array([6, 1, 1])))
