"""A tiny JAX OSUM exported as a torch package: loss/logits, merged vs PEFT, greedy tokens, batching, dtypes,
and the writer's guarantees (sharding, atomic output, fp16 overflow report)."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from osum_jax.convert.torch_package import Fp16OverflowError, PackageError, export_torch_package
from osum_jax.models import OSUM
from osum_jax.models.generate import greedy_decode
from osum_torch_infer.modeling import OSUMForConditionalGeneration
from osum_torch_infer.modeling import PackageError as LoadError
from tests.corpus import train_tokenizer
from tests.helpers import rel_err, tiny_model_config

CFG = tiny_model_config()


def _jax_model():
    model = OSUM(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n = 0
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":  # non-zero LoRA B, so merging actually matters
            var.set_value(0.2 * rng.standard_normal(var.shape).astype(np.float32))
            n += 1
    assert n == len(CFG.lora.targets)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, root / "tok", vocab_size=300)
    model = _jax_model()
    merged = root / "merged"
    peft_dir = root / "peft"
    info = export_torch_package(model, CFG, merged, tokenizer_dir=tok, dtype="fp32", progress=False)
    info_peft = export_torch_package(model, CFG, peft_dir, tokenizer_dir=tok, dtype="fp32", merge_lora=False,
                                     max_shard_bytes=300_000, progress=False)
    return dict(root=root, tok=tok, jax=model, merged=merged, peft=peft_dir, info=info, info_peft=info_peft,
                tm=OSUMForConditionalGeneration.from_pretrained(merged, device="cpu", dtype="fp32"),
                tp=OSUMForConditionalGeneration.from_pretrained(peft_dir, device="cpu", dtype="fp32"))


def make_batch(seed=0, feats_lengths=(173, 100, 41)):
    """Padding in all three blocks: prompt (-1), speech (feats lengths) and target (-100)."""
    rng = np.random.default_rng(seed)
    v = CFG.llm.vocab_size
    feats_lengths = np.array(feats_lengths)
    prompt_lengths = np.array([5, 3, 1])
    target_lengths = np.array([7, 4, 2])
    prompt = np.where(np.arange(5)[None] < prompt_lengths[:, None], rng.integers(0, v, (3, 5)), -1)
    target = np.where(np.arange(7)[None] < target_lengths[:, None], rng.integers(0, v, (3, 7)), -100)
    feats = rng.standard_normal((3, int(feats_lengths.max()), 80)).astype(np.float32)
    return dict(feats=feats, feats_lengths=feats_lengths, prompt=prompt, prompt_lengths=prompt_lengths,
                target=target, target_lengths=target_lengths)


def test_loss_and_logits_equal_jax(setup):
    batch = make_batch(1)
    ref = setup["jax"](batch)
    with torch.no_grad():
        out = setup["tm"](batch)
    assert rel_err(out["loss"].item(), float(ref["loss"])) <= 1e-5
    assert out["num_tokens"].item() == batch["target_lengths"].sum()
    assert out["logits"].dtype == torch.float32
    for b, n in enumerate(batch["target_lengths"]):
        assert rel_err(out["logits"][b, :n].numpy(), np.asarray(ref["logits"][b, :n])) <= 1e-4


@pytest.mark.parametrize("lengths", [(173, 100, 41), (172, 99, 40)])  # odd and even padded lengths
def test_each_utterance_equals_itself_alone(setup, lengths):
    tm = setup["tm"]
    batch = make_batch(2, lengths)
    with torch.no_grad():
        full = tm(batch)
    for b in range(3):  # an utterance in a padded batch gets exactly its batch-size-1 result
        n = batch["target_lengths"][b]
        one = {"feats": batch["feats"][b:b + 1, :batch["feats_lengths"][b]],
               "feats_lengths": batch["feats_lengths"][b:b + 1],
               "prompt": batch["prompt"][b:b + 1, :batch["prompt_lengths"][b]],
               "prompt_lengths": batch["prompt_lengths"][b:b + 1],
               "target": batch["target"][b:b + 1, :n], "target_lengths": batch["target_lengths"][b:b + 1]}
        with torch.no_grad():
            alone = tm(one)
        assert rel_err(full["logits"][b, :n].numpy(), alone["logits"][0].numpy()) <= 1e-5
    no_prompt = {k: v for k, v in batch.items() if not k.startswith("prompt")}
    empty = dict(batch, prompt=np.zeros((3, 0), np.int64), prompt_lengths=np.zeros(3, np.int64))
    with torch.no_grad():
        a, b = tm(no_prompt), tm(empty)
    np.testing.assert_allclose(a["logits"].numpy(), b["logits"].numpy(), rtol=1e-6, atol=1e-6)


def test_merged_and_peft_exports_agree(setup):
    from peft import PeftModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    batch = make_batch(3)
    with torch.no_grad():
        a, b = setup["tm"](batch), setup["tp"](batch)
    np.testing.assert_allclose(a["logits"].numpy(), b["logits"].numpy(), rtol=1e-5, atol=1e-5)
    # peft itself loads the adapters onto the exported (unmerged) Qwen2
    cfg = json.loads((setup["peft"] / "config.json").read_text())
    assert cfg["lora"]["merged"] is False
    qcfg = {k: v for k, v in cfg["text_config"].items() if k not in ("architectures", "model_type", "torch_dtype")}
    base = Qwen2ForCausalLM(Qwen2Config(**qcfg)).eval()
    index = json.loads((setup["peft"] / "model.safetensors.index.json").read_text())
    state = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(setup["peft"] / fname), "pt") as f:
            state.update({k[len("llm."):]: f.get_tensor(k) for k in f.keys() if k.startswith("llm.")})
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    pm = PeftModel.from_pretrained(base, str(setup["peft"])).eval()
    ids = torch.tensor([[3, 17, 99, 250, 7, 1]])
    with torch.no_grad():
        got = pm(input_ids=ids).logits
        want = setup["tm"].llm(input_ids=ids).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    with pm.disable_adapter(), torch.no_grad():
        off = pm(input_ids=ids).logits
    assert rel_err(off.numpy(), want.numpy()) > 1e-3  # the adapters matter (non-zero B)


def test_greedy_tokens_equal_jax_and_batched_equals_single(setup):
    tm = setup["tm"]
    batch = make_batch(4)
    n_new = 10
    decode = nnx.jit(greedy_decode, static_argnames=("max_new_tokens",))
    prompts = [batch["prompt"][b, :batch["prompt_lengths"][b]].tolist() for b in range(3)]
    ref = [r.tolist() for r in np.asarray(decode(setup["jax"], batch, max_new_tokens=n_new, eos_id=-5)[0])]
    out = tm.generate(batch["feats"], batch["feats_lengths"], prompts, max_new_tokens=n_new)
    assert out == ref
    # declare a token that row 1 emits mid-way to be the end of text: rows stop there, JAX agrees
    eos = ref[1][3]
    tm.eos_token_id = eos
    try:
        toks, lengths = decode(setup["jax"], batch, max_new_tokens=n_new, eos_id=eos)
        out = tm.generate(batch["feats"], batch["feats_lengths"], prompts, max_new_tokens=n_new)
        for b in range(3):
            assert out[b] == np.asarray(toks[b, :int(lengths[b])]).tolist()
        assert len(out[1]) == ref[1].index(eos)
        for b in range(3):  # batched == one by one (different lengths, left padding)
            f = batch["feats"][b:b + 1, :batch["feats_lengths"][b]]
            single = tm.generate(f, batch["feats_lengths"][b:b + 1], prompts[b:b + 1], max_new_tokens=n_new)
            assert single[0] == out[b]
    finally:
        tm.eos_token_id = setup["tm"].config.eos_token_id


def test_beam_and_osum_presets(setup):
    tm = setup["tm"]
    batch = make_batch(5)
    prompts = [batch["prompt"][b, :batch["prompt_lengths"][b]].tolist() for b in range(3)]
    gc = tm.decoding_config("osum")
    assert (gc.num_beams, gc.do_sample, gc.top_k, gc.top_p, gc.repetition_penalty) == (4, True, 5, 0.9, 1.05)
    beam1 = tm.generate(batch["feats"], batch["feats_lengths"], prompts, decoding="beam", max_new_tokens=6)
    beam2 = tm.generate(batch["feats"], batch["feats_lengths"], prompts, decoding="beam", max_new_tokens=6)
    assert beam1 == beam2 and all(len(r) == 6 for r in beam1)  # deterministic; eos never reached in 6 steps
    torch.manual_seed(0)
    sampled = tm.generate(batch["feats"], batch["feats_lengths"], prompts, decoding="osum", max_new_tokens=6)
    assert all(0 < len(r) <= 6 and all(0 <= t < CFG.llm.vocab_size for t in r) for r in sampled)
    with pytest.raises(ValueError, match="unknown decoding"):
        tm.decoding_config("nucleus")


def test_package_layout(setup):
    merged, peft_dir = setup["merged"], setup["peft"]
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "generation_config.json",
                                                       "model.safetensors", "processor_config.json", "prompts.yaml",
                                                       "tokenizer.json"]
    index = json.loads((peft_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == setup["info_peft"]["shards"] > 1
    assert all(name == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, name in enumerate(shards))
    with safe_open(str(peft_dir / shards[0]), "pt") as f:
        assert len(list(f.keys())) > 1
    for name in shards:  # at most the limit (+ header), unless one tensor alone is larger (as HF shards)
        with safe_open(str(peft_dir / name), "pt") as f:
            alone = len(list(f.keys())) == 1
        assert alone or (peft_dir / name).stat().st_size <= 300_000 + 20_000
    with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * len(CFG.lora.targets) * CFG.llm.num_layers
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["num_beams"] == 4 and gen["top_k"] == 5 and gen["repetition_penalty"] == 1.05
    assert gen["eos_token_id"] == setup["tm"].eos_token_id == 0  # <|endoftext|> of the test tokenizer
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == CFG.llm.num_layers and cfg["lora"]["merged"] is True


def test_transformers_auto_classes_and_save_pretrained(setup, tmp_path):
    """A package is a transformers checkpoint: AutoConfig/AutoModel load it once osum_torch_infer.modeling is
    imported (no trust_remote_code), with the merged and the peft layouts; save_pretrained writes a directory
    that loads back bit-exactly and whose config.json is the package schema."""
    import shutil

    from transformers import AutoConfig, AutoModel

    from osum_torch_infer.configuration_osum import OSUMConfig
    from osum_torch_infer.package import PackageConfig

    cfg = AutoConfig.from_pretrained(setup["merged"])
    assert isinstance(cfg, OSUMConfig) and cfg.text_config.model_type == "qwen2"
    assert cfg.text_config.num_hidden_layers == CFG.llm.num_layers and cfg.encoder.d_model == CFG.encoder.d_model
    batch = make_batch(4)
    with torch.no_grad():
        want = setup["tm"](batch)["logits"]
        for pkg, device_map in ((setup["merged"], "cpu"), (setup["peft"], "auto")):  # transformers' spellings
            m = AutoModel.from_pretrained(pkg, device_map=device_map, dtype=torch.float32)
            assert isinstance(m, OSUMForConditionalGeneration) and m.dtype == torch.float32
            np.testing.assert_allclose(m(batch)["logits"].numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    out = tmp_path / "resaved"
    setup["tm"].save_pretrained(out)
    for name in ("tokenizer.json", "prompts.yaml", "generation_config.json"):
        shutil.copy(setup["merged"] / name, out / name)
    saved, exported = (AutoConfig.from_pretrained(d).to_dict() for d in (out, setup["merged"]))
    saved.pop("transformers_version", None)
    assert saved == exported and PackageConfig.from_json(out / "config.json").text_config["num_hidden_layers"] == 2
    back = OSUMForConditionalGeneration.from_pretrained(out, device="cpu", dtype="fp32")
    with torch.no_grad():
        assert torch.equal(back(batch)["logits"], want)
    a, b = setup["tm"].state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a format-1 package (the LLM config under "llm") still loads
    cfg = json.loads((out / "config.json").read_text())
    cfg["llm"] = cfg.pop("text_config")
    cfg["format_version"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        v1 = OSUMForConditionalGeneration.from_pretrained(out, device="cpu", dtype="fp32")
        assert torch.equal(v1(batch)["logits"], want)


def test_refuses_overwrite_and_force_replaces(setup, tmp_path):
    out = tmp_path / "pkg"
    export_torch_package(setup["jax"], CFG, out, tokenizer_dir=setup["tok"], dtype="fp32", progress=False)
    marker = out / "config.json"
    before = marker.stat().st_mtime_ns
    with pytest.raises(PackageError, match="exists; --force"):
        export_torch_package(setup["jax"], CFG, out, tokenizer_dir=setup["tok"], progress=False)
    assert marker.stat().st_mtime_ns == before
    export_torch_package(setup["jax"], CFG, out, tokenizer_dir=setup["tok"], dtype="bf16", force=True,
                         progress=False)
    assert json.loads(marker.read_text())["torch_dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary leftovers
    with pytest.raises(PackageError, match="no tokenizer.json"):
        export_torch_package(setup["jax"], CFG, tmp_path / "x", tokenizer_dir=tmp_path, progress=False)


def test_bf16_and_fp16_packages_load_and_stay_close(setup, tmp_path):
    batch = make_batch(6)
    with torch.no_grad():
        ref = setup["tm"](batch)
    for dt in ("bf16", "fp16"):
        out = tmp_path / dt
        export_torch_package(setup["jax"], CFG, out, tokenizer_dir=setup["tok"], dtype=dt, progress=False)
        m = OSUMForConditionalGeneration.from_pretrained(out, device="cpu", dtype="auto")
        assert m.dtype == torch.float32  # auto on CPU computes in float32 (weights rounded to dt)
        with torch.no_grad():
            got = m(batch)
        assert abs(got["loss"].item() - ref["loss"].item()) / ref["loss"].item() < 2e-2
    m16 = OSUMForConditionalGeneration.from_pretrained(tmp_path / "bf16", device="cpu", dtype="bf16")
    assert m16.dtype == torch.bfloat16
    with torch.no_grad():
        got = m16(batch)
    assert got["logits"].dtype == torch.float32
    assert abs(got["loss"].item() - ref["loss"].item()) / ref["loss"].item() < 5e-2


def test_fp16_overflow_is_reported_not_written(setup, tmp_path):
    model = _jax_model()
    model.adapter.proj.bias.set_value(np.full(model.adapter.proj.bias.shape, 7e4, np.float32))
    k = model.llm.layers.mlp.up_proj.kernel
    big = np.asarray(k.get_value()).copy()
    big[1, 0, 0] = -1e6
    k.set_value(big)
    out = tmp_path / "fp16"
    with pytest.raises(Fp16OverflowError) as err:
        export_torch_package(model, CFG, out, tokenizer_dir=setup["tok"], dtype="fp16", progress=False)
    names = [n for n, _ in err.value.offenders]
    assert names == ["adapter.proj.bias", "llm.model.layers.1.mlp.up_proj.weight"]
    assert "1e+06" in str(err.value) and "adapter.proj.bias" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    export_torch_package(model, CFG, out, tokenizer_dir=setup["tok"], dtype="bf16", progress=False)  # bf16 is fine


def test_broken_packages_are_named(setup, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(setup["peft"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (bad / victim).unlink()
    with pytest.raises(LoadError, match=f"{victim}.*missing"):
        OSUMForConditionalGeneration.from_pretrained(bad, device="cpu")
    shutil.rmtree(bad)
    shutil.copytree(setup["merged"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["encoder"]["num_layers"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"missing \['encoder.layers.2"):
        OSUMForConditionalGeneration.from_pretrained(bad, device="cpu")
    cfg["encoder"]["num_layers"] -= 1
    cfg["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="format_version 99"):
        OSUMForConditionalGeneration.from_pretrained(bad, device="cpu")
    with pytest.raises(ValueError, match=r"batch\['feats_lengths'\]"):
        setup["tm"](dict(make_batch(), feats_lengths=np.array([174, 1, 1])))


def test_loading_in_fp16_reports_overflow_and_unsupported_adapters(setup, tmp_path):
    """A bf16/fp32 package loaded with dtype=fp16 must not turn large values into inf silently; adapter options
    the loader does not implement (rsLoRA, DoRA, per-module ranks) are refused, not merged wrongly."""
    import shutil

    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(setup["merged"], big)
    (f,) = sorted(big.glob("*.safetensors"))
    state = load_file(str(f))
    state["adapter.proj.bias"] = torch.full_like(state["adapter.proj.bias"], 7e4)
    save_file(state, str(f), metadata={"format": "pt"})
    OSUMForConditionalGeneration.from_pretrained(big, device="cpu", dtype="fp32")  # fine in fp32
    with pytest.raises(LoadError, match=r"float16 range.*adapter\.proj\.bias"):
        OSUMForConditionalGeneration.from_pretrained(big, device="cpu", dtype="fp16")
    for option in ({"use_rslora": True}, {"use_dora": True}, {"rank_pattern": {"q_proj": 16}}):
        odd = tmp_path / f"odd-{next(iter(option))}"
        shutil.copytree(setup["peft"], odd)
        acfg = json.loads((odd / "adapter_config.json").read_text())
        (odd / "adapter_config.json").write_text(json.dumps({**acfg, **option}))
        with pytest.raises(LoadError, match=next(iter(option))):
            OSUMForConditionalGeneration.from_pretrained(odd, device="cpu")


def test_generate_applies_overrides_to_a_given_config_and_stops_at_any_end_id(setup):
    tm = setup["tm"]
    b = make_batch(7)
    prompts = [list(map(int, p[p >= 0])) for p in b["prompt"]]
    free = tm.generate(b["feats"], b["feats_lengths"], prompts, max_new_tokens=6, min_new_tokens=6)
    assert all(len(r) == 6 for r in free)
    gc = tm.decoding_config("greedy", max_new_tokens=6, min_new_tokens=6)
    assert tm.generate(b["feats"], b["feats_lengths"], prompts, generation_config=gc) == free
    short = tm.generate(b["feats"], b["feats_lengths"], prompts, generation_config=gc, max_new_tokens=3,
                        min_new_tokens=3)
    assert short == [r[:3] for r in free]  # the keyword overrides apply to the given config too
    stop = free[0][2]  # a second end id: every row ends before its first occurrence of it
    gc2 = tm.decoding_config("greedy", max_new_tokens=6, min_new_tokens=0)
    gc2.eos_token_id = [tm.eos_token_id, stop]
    ended = tm.generate(b["feats"], b["feats_lengths"], prompts, generation_config=gc2)
    assert ended[0] == free[0][:free[0].index(stop)] and all(stop not in r for r in ended)
