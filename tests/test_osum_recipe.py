"""``osum-train --osum-config``: OSUM's training YAML drives a run, key by key (reference §1, §3, §6, §7)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from osum_jax.config import ConfigError

from osum_jax.config_loading import load_config
from osum_jax.osum_recipe import config_from_recipe, read_recipe

ROOT = Path(__file__).resolve().parents[1]

# The keys and values of OSUM's conf/config_llm_huawei_base-version.yaml (reference §1, §6, §7)
OSUM_YAML = {
    "model": "llmasr", "tokenizer": "huggingface", "tokenizer_conf": {"llm_path": "Qwen/Qwen2-7B"},
    "use_lora": True, "lora_alpha": 32, "lora_rank": 8, "lora_dropout": 0.1, "speech_token_num": 4097,
    "fire_module": "link_and_encoder_and_lora", "downsample_rate": 4, "adapter_type": "gxl",
    "llm_path": "Qwen/Qwen2-7B", "optim": "adamw",
    "optim_conf": {"betas": [0.9, 0.99], "eps": 1e-6, "lr": 5e-5, "weight_decay": 0.01},
    "scheduler": "warmuplr", "scheduler_conf": {"warmup_steps": 8000},
    "cmvn": None, "cmvn_conf": {"cmvn_file": None, "is_json_cmvn": None}, "ctc_conf": {"ctc_blank_id": 50362},
    "dataset": "asr",
    "dataset_conf": {
        "batch_conf": {"batch_size": 26, "batch_type": "dynamic", "max_frames_in_batch": 3900,
                       "max_seq_in_batch": 1900},
        "feats_type": "log_mel_spectrogram",
        "filter_conf": {"max_length": 2900, "min_length": 0, "token_max_length": 200, "token_min_length": 1,
                        "filter_no_extra_info": True, "max_seq_len": 1000},
        "language_conf": {"limited_langs": ["zh"]},
        "log_mel_spectrogram_conf": {"hop_length": 160, "n_fft": 400, "num_mel_bins": 80, "padding": 0},
        "resample_conf": {"resample_rate": 16000}, "shuffle": True, "shuffle_conf": {"shuffle_size": 1500},
        "sort": True, "sort_conf": {"sort_size": 500}, "spec_aug": True,
        "spec_aug_conf": {"max_f": 10, "max_t": 50, "num_f_mask": 2, "num_t_mask": 2}, "spec_sub": True,
        "spec_sub_conf": {"max_t": 30, "num_t_sub": 3}, "spec_trim": False, "speed_perturb": False,
        "eod_id": 151643, "split_num": 1, "multi_num": 1, "prompt_conf_path": "conf/prompt_config.yaml",
        "continue_data": False},
    "decoder": "transformer", "decoder_conf": {"activation_type": "gelu", "attention_heads": 16, "num_blocks": 24},
    "encoder": "transformer",
    "encoder_conf": {"activation_type": "gelu", "attention_dropout_rate": 0.0, "attention_heads": 16,
                     "dropout_rate": 0.1, "gradient_checkpointing": True, "input_layer": "conv1d2", "key_bias": False,
                     "linear_units": 4096, "normalize_before": True, "num_blocks": 24, "output_size": 1024,
                     "pos_enc_layer_type": "abs_pos_whisper", "positional_dropout_rate": 0.1,
                     "static_chunk_size": -1, "use_dynamic_chunk": False, "use_dynamic_left_chunk": False},
    "grad_clip": 5, "accum_grad": 4, "input_dim": 80, "log_interval": 10, "save_interval": 1250, "max_epoch": 100,
    "model_conf": {"ctc_weight": 0, "length_normalized_loss": False, "lsm_weight": 0.1}, "init_step": True,
}

# OSUM key -> (osum-jax key, a changed OSUM value, the osum-jax value it must give)
MAPPED = [
    ("lora_alpha", "model.lora.alpha", 16, 16.0),
    ("lora_rank", "model.lora.rank", 4, 4),
    ("lora_dropout", "model.lora.dropout", 0.05, 0.05),
    ("speech_token_num", "model.speech_token_num", 1000, 1000),
    ("fire_module", "train.fire_module", "link", "link"),
    ("optim_conf.betas", "train.adam_b2", [0.8, 0.95], 0.95),
    ("optim_conf.betas", "train.adam_b1", [0.8, 0.95], 0.8),
    ("optim_conf.eps", "train.adam_eps", 1e-8, 1e-8),
    ("optim_conf.lr", "train.learning_rate", 1e-4, 1e-4),
    ("optim_conf.weight_decay", "train.weight_decay", 0.1, 0.1),
    ("scheduler_conf.warmup_steps", "train.warmup_steps", 100, 100),
    ("dataset_conf.batch_conf.max_frames_in_batch", "data.max_frames_per_batch", 6000, 6000),
    ("dataset_conf.batch_conf.max_seq_in_batch", "data.max_tokens_per_batch", 2500, 2500),
    ("dataset_conf.filter_conf.max_length", "data.max_frames", 2000, 2000),
    ("dataset_conf.filter_conf.min_length", "data.min_frames", 20, 20),
    ("dataset_conf.filter_conf.token_max_length", "data.max_label_tokens", 150, 150),
    ("dataset_conf.filter_conf.token_min_length", "data.min_label_tokens", 2, 2),
    ("dataset_conf.filter_conf.filter_no_extra_info", "data.filter_no_extra_info", False, False),
    ("dataset_conf.filter_conf.max_seq_len", "data.max_seq_len", 800, 800),
    ("dataset_conf.resample_conf.resample_rate", "data.sample_rate", 8000, 8000),
    ("dataset_conf.shuffle", "data.shuffle", False, False),
    ("dataset_conf.spec_aug", "data.spec_aug", False, False),
    ("dataset_conf.spec_aug_conf.max_f", "data.spec_aug_max_f", 5, 5),
    ("dataset_conf.spec_aug_conf.max_t", "data.spec_aug_max_t", 20, 20),
    ("dataset_conf.spec_aug_conf.num_f_mask", "data.spec_aug_num_f_mask", 1, 1),
    ("dataset_conf.spec_aug_conf.num_t_mask", "data.spec_aug_num_t_mask", 3, 3),
    ("dataset_conf.spec_sub", "data.spec_sub", False, False),
    ("dataset_conf.spec_sub_conf.max_t", "data.spec_sub_max_t", 10, 10),
    ("dataset_conf.spec_sub_conf.num_t_sub", "data.spec_sub_num_t_sub", 2, 2),
    ("dataset_conf.continue_data", "train.resume_data", True, True),
    ("encoder_conf.attention_heads", "model.encoder.num_heads", 8, 8),
    ("encoder_conf.dropout_rate", "model.encoder.dropout", 0.2, 0.2),
    ("encoder_conf.gradient_checkpointing", "model.remat_policy", False, "none"),
    ("encoder_conf.key_bias", "model.encoder.key_bias", True, True),
    ("encoder_conf.linear_units", "model.encoder.ffn_dim", 2048, 2048),
    ("encoder_conf.num_blocks", "model.encoder.num_layers", 12, 12),
    ("encoder_conf.output_size", "model.encoder.d_model", 512, 512),
    ("encoder_conf.positional_dropout_rate", "model.encoder.positional_dropout", 0.0, 0.0),
    ("grad_clip", "train.grad_clip", 1, 1.0),
    ("accum_grad", "train.grad_accum", 8, 8),
    ("log_interval", "train.log_every", 50, 50),
    ("save_interval", "train.checkpoint_every", 500, 500),
    ("max_epoch", "data.num_epochs", 3, 3),
]

# OSUM key -> a value this implementation cannot honour
REFUSED = [
    ("model", "other"), ("downsample_rate", 2), ("adapter_type", "conv"), ("optim", "sgd"), ("scheduler", "cosine"),
    ("cmvn", "global_cmvn"), ("dataset_conf.batch_conf.batch_type", "static"), ("dataset_conf.sort", False),
    ("dataset_conf.spec_trim", True), ("dataset_conf.speed_perturb", True), ("dataset_conf.eod_id", 0),
    ("dataset_conf.split_num", 2), ("dataset_conf.multi_num", 2), ("dataset_conf.log_mel_spectrogram_conf.n_fft", 512),
    ("dataset_conf.log_mel_spectrogram_conf.hop_length", 320), ("encoder_conf.activation_type", "swish"),
    ("encoder_conf.attention_dropout_rate", 0.1), ("encoder_conf.input_layer", "conv2d"),
    ("encoder_conf.normalize_before", False), ("encoder_conf.pos_enc_layer_type", "rel_pos"),
    ("encoder_conf.use_dynamic_chunk", True),
]


def write_osum(root: Path, changes=(), prompts=True) -> Path:
    y = yaml.safe_load(yaml.safe_dump(OSUM_YAML))
    for key, value in changes:
        node = y
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    path = conf / "config_llm_huawei_base-version.yaml"
    path.write_text(yaml.safe_dump(y, allow_unicode=True), encoding="utf-8")
    if prompts:
        (conf / "prompt_config.yaml").write_text('"<TRANSCRIBE>": ["请转录这段音频。"]\n', encoding="utf-8")
    return path


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def resolve(path):
    base = yaml.safe_load((ROOT / "configs" / "osum_full.yaml").read_text())
    return config_from_recipe(read_recipe(path), base, [], str(path))


def test_osums_own_values_give_configs_osum_full(tmp_path):
    """OSUM's YAML on configs/osum_full.yaml changes nothing but what the file implies beyond it: its prompts,
    its epochs, its data order on resume and min_frames 0 (all stated in the table)."""
    cfg = resolve(write_osum(tmp_path))
    full = load_config(ROOT / "configs" / "osum_full.yaml")
    assert cfg.model == full.model
    assert cfg.train == __import__("dataclasses").replace(full.train, resume_data=False)
    assert cfg.data.prompts == str((tmp_path / "conf" / "prompt_config.yaml").resolve())
    assert (cfg.data.num_epochs, cfg.data.min_frames, cfg.data.filter_no_extra_info) == (100, 0, True)
    assert (cfg.data.max_frames_per_batch, cfg.data.max_tokens_per_batch) == (3900, 1900)


@pytest.mark.parametrize("osum_key,ours,value,expected", MAPPED, ids=[f"{m[0]}->{m[1]}" for m in MAPPED])
def test_each_osum_key_sets_its_osum_jax_key(tmp_path, osum_key, ours, value, expected):
    cfg = resolve(write_osum(tmp_path, [(osum_key, value)]))
    assert get(cfg, ours) == pytest.approx(expected) if isinstance(expected, float) else get(cfg, ours) == expected


def test_use_lora_false_means_no_lora(tmp_path):
    assert resolve(write_osum(tmp_path, [("use_lora", False)])).model.lora.rank == 0


@pytest.mark.parametrize("osum_key,value", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_value_that_cannot_be_honoured_is_an_error_naming_the_key(tmp_path, osum_key, value):
    with pytest.raises(ConfigError, match=f"{osum_key}: .*cannot be honoured"):
        read_recipe(write_osum(tmp_path, [(osum_key, value)]))


def test_an_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset_conf.cycle: not an OSUM key"):
        read_recipe(write_osum(tmp_path, [("dataset_conf.cycle", 5)]))


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "osum_jax.train.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_print_config_names_every_unused_key_and_round_trips(tmp_path):
    path = write_osum(tmp_path)
    out = run_train("--osum-config", str(path), "--print-config", "train.steps=7")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["data"]["prompts"].endswith("conf/prompt_config.yaml")
    assert load_config(_write(tmp_path / "printed.yaml", out.stdout)).to_dict() == cfg
    for key in ("model_conf.lsm_weight = 0.1: not used", "dataset_conf.batch_conf.batch_size = 26: not used",
                "decoder_conf.num_blocks = 24: not used", "optim_conf.lr = 5e-05 -> train.learning_rate"):
        assert key in out.stderr, key


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_cli_without_osums_prompts_is_one_line_and_exit_2(tmp_path):
    path = write_osum(tmp_path, prompts=False)
    out = run_train("--osum-config", str(path), "--print-config")
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("osum-train")]
    assert len(lines) == 1 and "prompt" in lines[0] and "--allow-default-prompts" in lines[0]
    ok = run_train("--osum-config", str(path), "--print-config", "--allow-default-prompts")
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["data"]["prompts"] == ""
    given = run_train("--osum-config", str(path), "--print-config", "--prompts", "my.yaml")
    assert given.returncode == 0 and yaml.safe_load(given.stdout)["data"]["prompts"] == "my.yaml"


def test_import_osum_without_prompts_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "osum_jax.convert.cli", "import-osum", str(tmp_path / "infer.pt"),
                          "--config", "configs/tiny.yaml", "--out", str(tmp_path / "ck")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("osum-convert")]
    assert len(lines) == 1 and "no OSUM prompt file" in lines[0] and not (tmp_path / "ck").exists()


def test_cli_global_frames_needs_a_device_count():
    out = run_train("configs/tiny.yaml", "--plan", "--global-frames", "374400")
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("osum-train")]
    assert lines == ["osum-train: --global-frames needs --target, or --devices and --device-memory-gb"]
    out = run_train("configs/tiny.yaml", "--global-frames", "374400")
    assert out.returncode == 2 and "go(es) with --plan" in out.stderr
