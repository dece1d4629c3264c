"""import-hf: HF Whisper + sharded HF Qwen2 (save_pretrained, safetensors) -> JAX checkpoint -> same numbers."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from osum_jax.config import AdapterConfig
from osum_jax import checkpoint as ck
from osum_jax.convert.cli import main
from tests.helpers import TINY, rel_err, tiny_model_config
from tests.test_convert_osum import TorchOSUM

CFG = tiny_model_config()
E, L = CFG.encoder, CFG.llm


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        d_model=E.d_model, encoder_layers=E.num_layers, encoder_attention_heads=E.num_heads,
        encoder_ffn_dim=E.ffn_dim, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        num_mel_bins=80, max_source_positions=E.max_source_positions, vocab_size=100, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        dropout=0.0)).eval()
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=L.vocab_size, hidden_size=L.hidden_size, intermediate_size=L.intermediate_size,
        num_hidden_layers=L.num_layers, num_attention_heads=L.num_heads, num_key_value_heads=L.num_kv_heads,
        head_dim=L.resolved_head_dim, rope_theta=L.rope_theta, rms_norm_eps=L.rms_norm_eps,
        tie_word_embeddings=False, attn_implementation="eager")).eval()
    with torch.no_grad():
        for m in (whisper, qwen):
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    qwen = qwen.to(torch.bfloat16)  # as Qwen2 checkpoints ship
    whisper.save_pretrained(d / "whisper", max_shard_size="60KB")
    qwen.save_pretrained(d / "qwen2", max_shard_size="100KB")
    ckpt = d / "ckpt"
    assert main(["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(d / "qwen2"), "--config", TINY,
                 "--out", str(ckpt), "--no-progress"]) == 0
    return d, whisper, qwen.float(), ckpt


def test_saved_sharded(hf):
    d = hf[0]
    for name in ("whisper", "qwen2"):
        index = json.loads((d / name / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2


def test_encoder_and_llm_match_hf(hf):
    _, whisper, qwen, ckpt = hf
    model, cfg = ck.load_model(ckpt)
    assert cfg.model == CFG
    feats = np.random.default_rng(0).standard_normal((1, 3000, 80)).astype(np.float32)
    with torch.no_grad():
        ref = whisper.model.encoder(torch.from_numpy(feats).transpose(1, 2)).last_hidden_state.numpy()
    out, _ = model.encoder(feats, np.array([3000]))
    assert rel_err(out, ref) <= 1e-4
    ids = np.random.default_rng(1).integers(0, L.vocab_size, (2, 11))
    with torch.no_grad():
        ref = qwen(input_ids=torch.from_numpy(ids)).logits.numpy()
    hidden = model.llm(model.llm.embed(ids), np.ones(ids.shape, bool), np.broadcast_to(np.arange(11), ids.shape))
    assert rel_err(model.llm.logits(hidden), ref) <= 1e-4


def test_config_from_hf_config_json(hf, tmp_path):
    d = hf[0]
    out = tmp_path / "derived"
    assert main(["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(d / "qwen2"), "--out", str(out),
                 "model.lora.rank=2", "--no-progress"]) == 0
    m = ck.read_config(out).model
    assert m.encoder == E and m.llm == L  # from the HF config.json files
    assert m.adapter == AdapterConfig() and m.lora.rank == 2  # OSUM's defaults plus the override
    assert ck.leaf_metadata(out)["llm.layers.mlp.gate_proj.lora_a"].shape == (L.num_layers, L.hidden_size, 2)


def test_fresh_parts_and_dtypes(hf):
    _, _, _, ckpt = hf
    meta = ck.leaf_metadata(ckpt)
    assert str(meta["llm.layers.mlp.up_proj.kernel"].dtype) == "bfloat16"  # kept as stored
    assert str(meta["encoder.layers.fc1.kernel"].dtype) == "float32"
    p = ck.restore_params(ckpt)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert not np.asarray(p[f"llm.layers.self_attn.{name}.lora_b"]).any()  # LoRA B = 0: base model unchanged
        a = np.asarray(p[f"llm.layers.self_attn.{name}.lora_a"])
        assert 0 < np.abs(a).max() <= 1 / np.sqrt(L.hidden_size)
    assert "llm.layers.mlp.up_proj.lora_a" not in p  # OSUM has no LoRA on up_proj
    assert np.asarray(p["adapter.proj.kernel"]).std() > 0 and np.asarray(p["speech_embed"]).std() > 0


def test_export_osum_from_hf_import_loads_strictly_into_osum_layout(hf, tmp_path):
    _, _, qwen, ckpt = hf
    out = tmp_path / "osum.pt"
    assert main(["export-osum", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    state = torch.load(out, weights_only=True)
    TorchOSUM().load_state_dict(state, strict=True)  # OSUM's complete key layout
    assert torch.equal(state["llama_model.base_model.model.model.layers.1.mlp.up_proj.weight"].float(),
                       qwen.model.layers[1].mlp.up_proj.weight)
    assert state["embed_tokens.weight"].data_ptr() == \
        state["llama_model.base_model.model.model.embed_tokens.weight"].data_ptr()


def _fails(capsys, argv, *patterns):
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert re.search(p, err), (p, err)


def test_errors(hf, capsys, tmp_path):
    d, _, _, ckpt = hf
    args = ["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(d / "qwen2")]
    _fails(capsys, args + ["--config", TINY, "model.llm.intermediate_size=128", "--out", str(tmp_path / "a")],
           r"model\.llm\.intermediate_size: .* has 128, .*qwen2/config\.json has 160")
    _fails(capsys, args + ["--out", str(ckpt)], r"already exists.*--force")
    # a truncated shard and a shard the index lists but that is gone
    broken = tmp_path / "qwen2"
    broken.mkdir()
    for f in (d / "qwen2").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    bad = ["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(broken), "--out", str(tmp_path / "b")]
    _fails(capsys, bad, re.escape(str(shard)), "truncated")
    shard.unlink()
    _fails(capsys, bad, r"index\.json lists shard\(s\) that do not exist", re.escape(shard.name))
    assert not (tmp_path / "b").exists()
    # an extra tensor in the LLM checkpoint
    from safetensors.torch import save_file

    extra = tmp_path / "qwen_extra"
    extra.mkdir()
    (extra / "config.json").write_bytes((d / "qwen2" / "config.json").read_bytes())
    qstate = {k: v.contiguous() for k, v in hf[2].state_dict().items()}
    qstate["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(qstate, extra / "model.safetensors")
    _fails(capsys, ["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(extra), "--out",
                    str(tmp_path / "c")], r"1 unexpected key.*model\.layers\.0\.mlp\.extra\.weight")
    del qstate["model.layers.0.mlp.extra.weight"], qstate["model.layers.1.self_attn.k_proj.bias"]
    save_file(qstate, extra / "model.safetensors")
    _fails(capsys, ["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(extra), "--out",
                    str(tmp_path / "c")], r"missing key.*model\.layers\.1\.self_attn\.k_proj\.bias")


def test_inspect_safetensors_dir(hf, capsys):
    assert main(["inspect", str(hf[0] / "qwen2")]) == 0
    text = capsys.readouterr().out
    assert "model.layers" in text and "bfloat16" in text


def test_hf_to_jax_to_torch_package_same_logits(hf, tmp_path):
    """The whole chain of issue 5: HF Whisper + HF Qwen2 -> import-hf -> export-torch (CLI) -> osum_torch_infer
    gives the JAX model's loss and logits through the shared batch contract (fp32, merged and PEFT exports)."""
    from osum_torch_infer.modeling import OSUMForConditionalGeneration
    from tests.corpus import train_tokenizer

    _, _, _, ckpt = hf
    model, cfg = ck.load_model(ckpt)
    # give LoRA B non-zero values so that the merged/PEFT paths are really exercised
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":
            var.set_value(0.05 * np.random.default_rng(len(path)).standard_normal(var.shape).astype(np.float32))
    tok = train_tokenizer(["transcribe the speech"], tmp_path / "tok", vocab_size=300)
    from osum_jax.convert.torch_package import export_torch_package

    rng = np.random.default_rng(3)
    batch = dict(feats=rng.standard_normal((2, 160, 80)).astype(np.float32), feats_lengths=np.array([160, 97]),
                 prompt=np.array([[5, 6, 7], [8, 9, -1]]), prompt_lengths=np.array([3, 2]),
                 target=np.array([[10, 11, 12, 13], [14, 15, -100, -100]]), target_lengths=np.array([4, 2]))
    ref = model(batch)
    for merge in (True, False):
        pkg = tmp_path / f"pkg{int(merge)}"
        export_torch_package(model, cfg.model, pkg, tokenizer_dir=tok, dtype="fp32", merge_lora=merge,
                             progress=False)
        tm = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
        with torch.no_grad():
            out = tm({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})
        assert rel_err(out["loss"].item(), float(ref["loss"])) <= 1e-5
        for b, n in enumerate(batch["target_lengths"]):
            assert rel_err(out["logits"][b, :n].numpy(), np.asarray(ref["logits"][b, :n])) <= 1e-4
    # and the CLI path from the import-hf checkpoint itself (LoRA B = 0 there) writes a loadable package
    assert main(["export-torch", str(ckpt), "--tokenizer", str(tok), "--out", str(tmp_path / "cli_pkg"),
                 "--dtype", "fp32", "--no-progress"]) == 0
    fresh, _ = ck.load_model(ckpt)
    tm = OSUMForConditionalGeneration.from_pretrained(tmp_path / "cli_pkg", device="cpu", dtype="fp32")
    with torch.no_grad():
        out = tm({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})
    assert rel_err(out["loss"].item(), float(fresh(batch)["loss"])) <= 1e-5


@pytest.mark.parametrize("band_bytes", [64 << 20, 256])
def test_export_streams_from_disk_and_equals_the_in_memory_export(hf, tmp_path, monkeypatch, band_bytes):
    """export-torch reads the checkpoint lazily (one tensor / one layer at a time) and writes large tensors in
    row bands; the files are byte-identical to an export of the fully loaded model (merged and PEFT, bf16/fp16)."""
    import functools

    from osum_jax import checkpoint as ckm
    from osum_jax.convert import torch_package as tp
    from osum_jax.convert.export_torch import export_torch, lazy_checkpoint
    from tests.corpus import train_tokenizer

    _, _, _, ckpt = hf
    monkeypatch.setattr(tp, "_bands", functools.partial(tp._bands, band_bytes=band_bytes))
    leaves, _ = lazy_checkpoint(ckpt)
    assert all(isinstance(v, ckm.LazyLeaf) for v in leaves.values())
    model, cfg = ck.load_model(ckpt)
    tok = train_tokenizer(["transcribe the speech"], tmp_path / "tok", vocab_size=300)
    for merge, dtype in ((True, "bf16"), (False, "fp16")):
        a, b = tmp_path / f"lazy{merge}", tmp_path / f"mem{merge}"
        export_torch(ckpt, out=a, tokenizer=tok, dtype=dtype, merge_lora=merge, progress=False)
        meta = json.loads((a / "config.json").read_text())["metadata"]  # provenance: source and prompt origin
        assert meta == {"source_checkpoint": str(ckpt.absolute()), "prompts": {"origin": "project-default"}}
        tp.export_torch_package(model, cfg.model, b, tokenizer_dir=tok, dtype=dtype, merge_lora=merge,
                                progress=False, extra_metadata=meta)
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir()) and any(f.endswith(".safetensors") for f in files)
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_commands_with_relative_paths(hf, tmp_path):
    """The README's osum-convert commands, run as the README shows them (the console script, relative paths):
    import-hf --out ckpt/..., inspect, export-torch, export-osum, and load_model("ckpt/...") from Python."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.corpus import train_tokenizer

    d = hf[0]
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    shutil.copytree(d / "whisper", work / "hf" / "whisper")
    shutil.copytree(d / "qwen2", work / "hf" / "qwen2")
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", work / "configs")
    train_tokenizer(["transcribe the speech"], work / "tok", vocab_size=300)
    exe = str(Path(sys.executable).parent / "osum-convert")
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(*argv):
        r = subprocess.run([exe, *argv], cwd=work, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, (argv, r.stderr[-3000:])
        assert "Traceback" not in r.stderr
        return r

    run("import-hf", "--whisper", "hf/whisper", "--qwen2", "hf/qwen2", "--config", TINY, "--out", "ckpt/osum",
        "--no-progress")
    assert "JAX checkpoint" in run("inspect", "ckpt/osum").stdout
    run("export-torch", "ckpt/osum", "--tokenizer", "tok", "--out", "pkg/osum", "--dtype", "fp32", "--no-progress")
    run("export-osum", "ckpt/osum", "--out", "osum.pt", "--no-progress")
    assert (work / "pkg" / "osum" / "config.json").is_file() and (work / "osum.pt").is_file()
    r = subprocess.run([sys.executable, "-c", "from osum_jax.checkpoint import load_model; "
                        "m, c = load_model('ckpt/osum'); print(c.model.llm.num_layers)"],
                       cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == str(L.num_layers), r.stderr[-3000:]


def test_osum_yaml_and_prompts_with_hf_weights(hf, tmp_path, capsys):
    """import-hf --osum-config takes the adapter/LoRA/speech-token settings from OSUM's model YAML (the HF files
    cannot know them) and checks them against --config; --prompts stores OSUM's prompt book with the checkpoint;
    the files' hashes go into the layout."""
    import hashlib

    import yaml

    from tests.test_osum_release import PROMPTS, _osum_yaml

    d = hf[0]
    y = _osum_yaml(CFG)
    y.update(lora_rank=3, lora_alpha=12.0)  # a release trained with other LoRA settings than configs/tiny.yaml
    (tmp_path / "osum.yaml").write_text(yaml.safe_dump(y), encoding="utf-8")
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS, allow_unicode=True), encoding="utf-8")
    args = ["import-hf", "--whisper", str(d / "whisper"), "--qwen2", str(d / "qwen2"), "--osum-config",
            str(tmp_path / "osum.yaml"), "--prompts", str(tmp_path / "prompts.yaml")]
    _fails(capsys, args + ["--config", TINY, "--out", str(tmp_path / "x")],
           r"model\.lora\.rank: .* has \d+, .*osum\.yaml has 3", r"model\.lora\.alpha: .* has 16\.0, .*osum\.yaml has 12\.0")
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ok"
    assert main(args + ["--config", TINY, "model.lora.rank=3", "model.lora.alpha=12.0", "--out", str(out),
                        "--no-progress"]) == 0
    # without --config: encoder/LLM from the HF files, the rest from OSUM's YAML
    assert main(args + ["--out", str(tmp_path / "ok2"), "--no-progress"]) == 0
    for c in (out, tmp_path / "ok2"):
        cfg = ck.read_config(c).model
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.encoder.d_model, cfg.llm.hidden_size) == (3, 12.0, E.d_model,
                                                                                               L.hidden_size)
        src = ck.read_layout(c)["source"]
        assert src["osum_config"]["sha256"] == hashlib.sha256((tmp_path / "osum.yaml").read_bytes()).hexdigest()
        assert src["prompts"]["sha256"] == hashlib.sha256((tmp_path / "prompts.yaml").read_bytes()).hexdigest()
        assert ck.read_prompts(c)["prompts"]["<TRANSCRIBE>"] == PROMPTS["<TRANSCRIBE>"]
