"""Config loading: YAML files, dotted overrides, and clear errors."""

import pytest

from osum_jax.config import Config, ConfigError

from osum_jax.config_loading import config_from_dict, load_config


def test_full_config_is_osum():
    m = load_config("configs/osum_full.yaml").model
    e, a, l, r = m.encoder, m.adapter, m.llm, m.lora
    assert (e.num_layers, e.d_model, e.num_heads, e.ffn_dim, e.num_mel_bins, e.key_bias) == (24, 1024, 16, 4096, 80,
                                                                                             False)
    assert (a.conv_kernel, a.conv_strides, a.num_layers, a.num_heads, a.ffn_dim, a.activation) == (
        3, (1, 2, 2), 4, 4, 2560, "relu")
    assert (l.num_layers, l.hidden_size, l.num_heads, l.num_kv_heads, l.intermediate_size, l.vocab_size) == (
        28, 3584, 28, 4, 18944, 152064)
    assert (l.rope_theta, l.rms_norm_eps, l.tie_word_embeddings) == (1e6, 1e-6, False)
    assert (r.rank, r.alpha, r.dropout, r.scaling) == (8, 32.0, 0.1, 4.0)
    assert set(r.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    assert m.speech_token_num == 4097
    assert m.scan_unroll == "auto"  # the recipe unrolls its layer stacks on TPU (docs/benchmarks.md)
    # the file spells out the defaults, so it must equal the dataclass defaults except for the dtype policy
    assert m.encoder == Config().model.encoder and m.llm.hidden_size == Config().model.llm.hidden_size


@pytest.mark.parametrize("path", ["configs/osum_full.yaml", "configs/tiny.yaml", "configs/small.yaml"])
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    import yaml
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["model.llm.num_layers=3", "model.lora.alpha=8",
                                            "model.adapter.conv_strides=[1,2]", "model.dtype=bfloat16",
                                            "model.encoder.key_bias=true"])
    assert cfg.model.llm.num_layers == 3
    assert cfg.model.lora.alpha == 8.0 and isinstance(cfg.model.lora.alpha, float)
    assert cfg.model.adapter.conv_strides == (1, 2)
    assert cfg.model.dtype == "bfloat16" and cfg.model.encoder.key_bias is True


@pytest.mark.parametrize("override, message", [
    ("model.llm.num_layer=3", "unknown key 'num_layer' under model.llm"),
    ("model.llm.num_layers=three", "expected an integer"),
    ("model.encoder.key_bias=1", "expected true/false"),
    ("model.llm=3", "expected a mapping"),
    ("model.dtype=float64", "model.dtype"),
    ("model.remat_policy=some", "remat_policy"),
    ("model.scan_unroll=-1", r"model.scan_unroll=-1; expected auto, 0"),
    ("model.scan_unroll=fast", r"model.scan_unroll='fast'; expected auto, 0"),
    ("model.llm.num_kv_heads=3", "not divisible by num_kv_heads"),
    ("model.lora.targets=[q_proj,w_proj]", "unknown modules"),
    ("model.llm.num_layers", "key=value"),
    ("train.checkpoint_every=0", r"train.checkpoint_every=0; must be >= 1"),
    ("train.log_every=0", r"train.log_every=0; must be >= 1"),
    ("train.eval_every=-5", r"train.eval_every=-5"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_bad_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  llm:\n    hidden: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key\(s\) \['hidden'\]"):
        load_config(p)
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_frozen_rules_override_only_the_names_they_list():
    from osum_jax.train.mesh import frozen_rules_of

    cfg = load_config("configs/tiny.yaml", ["train.mesh.frozen_rules=[[embed, null]]"])
    rules = dict(frozen_rules_of(cfg.train.mesh))
    assert rules["embed"] is None and rules["mlp"] == "tensor" and "layers" in rules
    assert frozen_rules_of(load_config("configs/tiny.yaml").train.mesh) == tuple(
        tuple(r) for r in load_config("configs/tiny.yaml").train.mesh.rules)
