"""Starting from OSUM's release, as its users arrive: an ``infer.pt`` in OSUM's layout, OSUM's own model YAML, the
Qwen2 ``config.json`` and a prompt_config.yaml with Chinese prompts. The documented path runs with CLI commands only
(the console scripts, relative paths): import-osum with OSUM's files, export-torch (OSUM's prompts shipped without
a flag), osum-infer from a list and from tar shards with per-utterance prompts, osum-eval. Every non-shape
mismatch between OSUM's files and the config is an error naming the key and both values."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from tests.corpus import train_tokenizer
from tests.helpers import write_tar
from tests.test_convert_osum import CFG, build_torch_osum, osum_state

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = {"<TRANSCRIBE>": ["请转录这段音频的内容。", "把这段语音转写成文字。"], "<S2TCHAT>": ["请回答音频中的问题。"]}
pytestmark = pytest.mark.e2e


def _osum_yaml(m) -> dict:
    """OSUM's model YAML layout (conf/config_llm_huawei_base-version.yaml), at this tiny model's sizes."""
    e = m.encoder
    return {"model": "llmasr", "use_lora": True, "lora_alpha": m.lora.alpha, "lora_rank": m.lora.rank,
            "lora_dropout": m.lora.dropout, "speech_token_num": m.speech_token_num,
            "fire_module": "link_and_encoder_and_lora", "downsample_rate": 4, "adapter_type": "gxl",
            "input_dim": e.num_mel_bins,
            "encoder_conf": {"activation_type": "gelu", "attention_dropout_rate": 0.0, "attention_heads": e.num_heads,
                             "dropout_rate": e.dropout, "input_layer": "conv1d2", "key_bias": e.key_bias,
                             "linear_units": e.ffn_dim, "normalize_before": True, "num_blocks": e.num_layers,
                             "output_size": e.d_model, "pos_enc_layer_type": "abs_pos_whisper",
                             "positional_dropout_rate": e.positional_dropout, "static_chunk_size": -1},
            "dataset_conf": {"filter_conf": {"max_length": 2900, "token_max_length": 200, "max_seq_len": 1000,
                                             "filter_no_extra_info": True}}}


def _qwen2_json(m) -> dict:
    q = m.llm
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": q.vocab_size,
            "hidden_size": q.hidden_size, "intermediate_size": q.intermediate_size,
            "num_hidden_layers": q.num_layers, "num_attention_heads": q.num_heads,
            "num_key_value_heads": q.num_kv_heads, "head_dim": q.resolved_head_dim, "rope_theta": q.rope_theta,
            "rms_norm_eps": q.rms_norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
            "max_position_embeddings": 32768}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    w = tmp_path_factory.mktemp("release")
    (w / "osum").mkdir()
    state = osum_state(build_torch_osum())
    state["embed_tokens.weight"] = state["llama_model.base_model.model.model.embed_tokens.weight"]
    state["lm_head.weight"] = state["llama_model.base_model.model.lm_head.weight"]
    torch.save(state, w / "osum" / "infer.pt")
    (w / "osum" / "config.yaml").write_text(yaml.safe_dump(_osum_yaml(CFG)), encoding="utf-8")
    (w / "osum" / "prompt_config.yaml").write_text(yaml.safe_dump(PROMPTS, allow_unicode=True), encoding="utf-8")
    (w / "qwen2").mkdir()
    (w / "qwen2" / "config.json").write_text(json.dumps(_qwen2_json(CFG)))
    train_tokenizer(sum(PROMPTS.values(), []) + ["what is said here", "alpha bravo"] * 3, w / "tok",
                    vocab_size=400)
    shutil.copytree(ROOT / "configs", w / "configs")
    rng = np.random.default_rng(0)
    entries, members = [], []
    for i, sec in enumerate((1.1, 0.8, 1.3)):
        sf.write(w / f"u{i}.wav", (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000,
                 subtype="PCM_16")
        e = {"key": f"u{i}", "wav": f"u{i}.wav", "txt": "alpha bravo", "task": "<TRANSCRIBE>"}
        if i == 1:
            e.update(task="<S2TCHAT>", extra={"question": "what is said here"})
        entries.append(e)
        members += [(f"u{i}.wav", (w / f"u{i}.wav").read_bytes()), (f"u{i}.txt", b"alpha bravo"),
                    (f"u{i}.task", e["task"].encode())]
        if "extra" in e:
            members.append((f"u{i}.extra", json.dumps(e["extra"]).encode()))
    (w / "test.list").write_text("".join(json.dumps(e) + "\n" for e in entries))
    write_tar(w / "shard_000.tar", members)
    (w / "shards_list.txt").write_text("shard_000.tar\n")
    return w


def _run(w, tool, *args, rc=0):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([str(BIN / tool), *args], cwd=w, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == rc, (tool, args, r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


IMPORT = ["import-osum", "osum/infer.pt", "--osum-config", "osum/config.yaml", "--llm-config", "qwen2/config.json",
          "--prompts", "osum/prompt_config.yaml", "--config", "configs/tiny.yaml", "--no-progress"]


@pytest.mark.slow
def test_the_documented_path_from_osums_release(release):
    w = release
    _run(w, "osum-convert", *IMPORT, "--out", "ckpt/osum-release")
    layout = json.loads((w / "ckpt/osum-release/0/osum_layout/metadata").read_text())
    assert {"osum_config", "llm_config", "prompts"} <= set(layout["source"])  # source files' hashes recorded
    r = _run(w, "osum-convert", "export-torch", "ckpt/osum-release", "--tokenizer", "tok", "--out", "pkg/osum",
             "--dtype", "fp32", "--no-progress")
    assert "never saw" not in r.stderr
    assert yaml.safe_load((w / "pkg/osum/prompts.yaml").read_text(encoding="utf-8")) == PROMPTS  # no flag needed
    common = ["--model", "pkg/osum", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    _run(w, "osum-infer", *common, "--data", "test.list", "--out", "hyp_list.jsonl")
    _run(w, "osum-infer", *common, "--data", "shards_list.txt", "--out", "hyp_shards.jsonl")
    a = [json.loads(x) for x in (w / "hyp_list.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (w / "hyp_shards.jsonl").read_text().splitlines()]
    assert [(r["key"], r["prompt"], r["text"]) for r in a] == [(r["key"], r["prompt"], r["text"]) for r in b]
    assert a[0]["prompt"] == PROMPTS["<TRANSCRIBE>"][0] and a[1]["prompt"] == "what is said here"
    _run(w, "osum-eval", "--ref", "test.list", "--hyp", "hyp_list.jsonl", "--out", "report")
    assert json.loads((w / "report/report.json").read_text(encoding="utf-8"))["tasks"]
    # without OSUM's prompts: a loud warning at export, and again at load
    # (OSUM's YAML alone in its folder: no prompt file beside it to be found; the flag lets the import go on)
    (w / "lone").mkdir(exist_ok=True)
    (w / "lone" / "config.yaml").write_text((w / "osum" / "config.yaml").read_text(encoding="utf-8"),
                                            encoding="utf-8")
    _run(w, "osum-convert", *[a if a != "osum/config.yaml" else "lone/config.yaml" for a in IMPORT
                              if a not in ("--prompts", "osum/prompt_config.yaml")],
         "--allow-default-prompts", "--out", "ckpt/no-prompts")
    r = _run(w, "osum-convert", "export-torch", "ckpt/no-prompts", "--tokenizer", "tok", "--out", "pkg/np",
             "--dtype", "fp32", "--no-progress")
    assert "export-torch: WARNING" in r.stderr and "never saw" in r.stderr
    r = _run(w, "osum-infer", "--model", "pkg/np", "--data", "test.list", "--max-new-tokens", "1", "--device", "cpu",
             "--no-progress", "--out", "np.jsonl")
    assert "never saw" in r.stderr


@pytest.mark.parametrize("where, key, value, needle", [
    ("yaml", "lora_alpha", 32.0, "model.lora.alpha"),
    ("yaml", "lora_dropout", 0.05, "model.lora.dropout"),
    ("yaml_enc", "attention_heads", 8, "model.encoder.num_heads"),
    ("yaml_enc", "key_bias", True, "model.encoder.key_bias"),
    ("yaml", "speech_token_num", 9, "model.speech_token_num"),
    ("qwen", "num_attention_heads", 8, "model.llm.num_heads"),
    ("qwen", "num_key_value_heads", 4, "model.llm.num_kv_heads"),
    ("qwen", "rope_theta", 1e6, "model.llm.rope_theta"),
    ("qwen", "rms_norm_eps", 1e-5, "model.llm.rms_norm_eps"),
])
def test_each_non_shape_mismatch_is_named(release, tmp_path, where, key, value, needle):
    w = release
    y, q = _osum_yaml(CFG), _qwen2_json(CFG)
    {"yaml": y, "yaml_enc": y["encoder_conf"], "qwen": q}[where][key] = value
    (tmp_path / "osum.yaml").write_text(yaml.safe_dump(y))
    (tmp_path / "config.json").write_text(json.dumps(q))
    args = [a if a not in ("osum/config.yaml", "qwen2/config.json") else
            str(tmp_path / ("osum.yaml" if a.endswith("yaml") else "config.json")) for a in IMPORT]
    r = _run(w, "osum-convert", *args, "--out", str(tmp_path / "ck"), rc=2)
    line = next(x for x in r.stderr.splitlines() if needle in x)
    assert repr(value) in line or str(value) in line, line
    assert not (tmp_path / "ck").exists()


def test_unsupported_osum_settings_are_refused(release, tmp_path):
    y = _osum_yaml(CFG)
    y["adapter_type"] = "conv"
    (tmp_path / "osum.yaml").write_text(yaml.safe_dump(y))
    r = _run(release, "osum-convert", "import-osum", "osum/infer.pt", "--osum-config", str(tmp_path / "osum.yaml"),
             "--config", "configs/tiny.yaml", "--out", str(tmp_path / "ck"), "--no-progress",
             "--allow-default-prompts", rc=2)
    assert "adapter_type: 'conv' is not supported" in r.stderr


def test_osum_train_takes_the_stored_prompts_by_default(release, tmp_path):
    import jax

    from osum_jax.config_loading import load_config
    from osum_jax.convert import commands
    from osum_jax.train.trainer import Trainer

    w = release
    ck = tmp_path / "ck"
    commands.import_osum(w / "osum/infer.pt", str(w / "configs/tiny.yaml"), out=ck, progress=False,
                         osum_config=w / "osum/config.yaml", prompts=w / "osum/prompt_config.yaml")
    cfg = load_config(str(w / "configs/tiny.yaml"), [f"train.init_from={ck}", f"train.output_dir={tmp_path / 'run'}",
                                                      "train.mesh.fsdp=1"])
    tr = Trainer(cfg, devices=jax.devices()[:1])
    assert tr._prompts.prompts == PROMPTS and "prompts stored with it" in tr._prompts.source
