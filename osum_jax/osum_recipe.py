"""OSUM's own training YAML (``conf/config_llm_huawei_base-version.yaml``) as an osum-jax config.

``osum-train --osum-config conf/config_llm_huawei_base-version.yaml data.train=... data.tokenizer=...`` reads
every key of that file through :data:`KEYS`, one row per OSUM key: the osum-jax key it sets, a value it must have
(what this implementation does, anything else is an error naming the key), or why it is not used. A key that is
not in the table is an error too: its meaning is unknown, so it cannot be honoured. ``key=value`` overrides
apply after the file. OSUM's ``prompt_conf_path`` is looked for beside the YAML and at OSUM's repository root
(the YAML's parent folder); see :func:`find_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .config import Config, ConfigError

from .config_loading import config_from_dict


_ANY = object()  # no required value


@dataclass(frozen=True)
class Key:
    """One OSUM key: ``to`` (osum-jax dotted keys it sets, through ``convert``), ``must`` (the only value this
    implementation honours) and/or ``unused`` (why the value changes nothing here)."""

    to: tuple[str, ...] = ()
    convert: Callable[[Any], Any] = lambda v: v
    must: Any = _ANY
    unused: str = ""


def _set(*keys: str, convert: Callable[[Any], Any] = lambda v: v) -> Key:
    return Key(to=keys, convert=convert)


def _must(value: Any, why: str = "") -> Key:
    return Key(must=value, unused=why)


def _unused(why: str) -> Key:
    return Key(unused=why)


NO_CTC = "OSUM's LLM model has no CTC branch or wenet decoder (reference §10.15)"
MODEL_ARCH = "the Qwen2 architecture is model.llm (configs/osum_full.yaml); its weights come from train.init_from"

# OSUM's dotted key -> what it does here (reference §1, §3, §6, §7)
KEYS: dict[str, Key] = {
    "model": _must("llmasr"),
    "tokenizer": _must("huggingface"),
    "tokenizer_conf.llm_path": _unused("the tokenizer is data.tokenizer, a local directory (no model hub here)"),
    "llm_path": _unused(MODEL_ARCH),
    "use_lora": _unused("read with the LoRA keys: false means no LoRA (model.lora.rank 0)"),
    "lora_rank": _set("model.lora.rank"),
    "lora_alpha": _set("model.lora.alpha", convert=float),
    "lora_dropout": _set("model.lora.dropout", convert=float),
    "speech_token_num": _set("model.speech_token_num"),
    "fire_module": _set("train.fire_module"),
    "downsample_rate": _must(4, "the adapter's conv strides are 1, 2, 2"),
    "adapter_type": _must("gxl"),
    "optim": _must("adamw"),
    "optim_conf.betas": _set("train.adam_b1", "train.adam_b2", convert=lambda v: tuple(float(b) for b in v)),
    "optim_conf.eps": _set("train.adam_eps", convert=float),
    "optim_conf.lr": _set("train.learning_rate", convert=float),
    "optim_conf.weight_decay": _set("train.weight_decay", convert=float),
    "scheduler": _set("train.schedule", convert=lambda v: {"warmuplr": "warmup_inverse_sqrt"}[v]),
    "scheduler_conf.warmup_steps": _set("train.warmup_steps"),
    "cmvn": _must(None, "features are not mean/variance normalised"),
    "cmvn_conf.cmvn_file": _unused("cmvn is null"),
    "cmvn_conf.is_json_cmvn": _unused("cmvn is null"),
    "ctc_conf.ctc_blank_id": _unused(NO_CTC),
    "dataset": _must("asr"),
    "dataset_conf.batch_conf.batch_size": _unused("dynamic batching does not read it"),
    "dataset_conf.batch_conf.batch_type": _must("dynamic", "per-device packing by OSUM's rule (docs/data.md)"),
    "dataset_conf.batch_conf.max_frames_in_batch": _set("data.max_frames_per_batch"),
    "dataset_conf.batch_conf.max_seq_in_batch": _set("data.max_tokens_per_batch"),
    "dataset_conf.feats_type": _must("log_mel_spectrogram"),
    "dataset_conf.filter_conf.max_length": _set("data.max_frames"),
    "dataset_conf.filter_conf.min_length": _set("data.min_frames"),
    "dataset_conf.filter_conf.token_max_length": _set("data.max_label_tokens"),
    "dataset_conf.filter_conf.token_min_length": _set("data.min_label_tokens"),
    "dataset_conf.filter_conf.filter_no_extra_info": _set("data.filter_no_extra_info", convert=bool),
    "dataset_conf.filter_conf.max_seq_len": _set("data.max_seq_len"),
    "dataset_conf.filter_conf.min_output_input_ratio": _unused("OSUM's filter accepts it and never applies it"),
    "dataset_conf.filter_conf.max_output_input_ratio": _unused("OSUM's filter accepts it and never applies it"),
    "dataset_conf.language_conf.limited_langs": _unused("OSUM's LLM data pipeline has no language filter"),
    "dataset_conf.log_mel_spectrogram_conf.hop_length": _must(160),
    "dataset_conf.log_mel_spectrogram_conf.n_fft": _must(400),
    "dataset_conf.log_mel_spectrogram_conf.num_mel_bins": _set("data.num_mel_bins", "model.encoder.num_mel_bins"),
    "dataset_conf.log_mel_spectrogram_conf.padding": _must(0),
    "dataset_conf.resample_conf.resample_rate": _set("data.sample_rate"),
    "dataset_conf.shuffle": _set("data.shuffle", convert=bool),
    "dataset_conf.shuffle_conf.shuffle_size": _unused("a full per-epoch permutation replaces the shuffle buffer"),
    "dataset_conf.sort": _must(True, "the length buckets group utterances of like length"),
    "dataset_conf.sort_conf.sort_size": _unused("the length buckets group utterances of like length"),
    "dataset_conf.spec_aug": _set("data.spec_aug", convert=bool),
    "dataset_conf.spec_aug_conf.max_f": _set("data.spec_aug_max_f"),
    "dataset_conf.spec_aug_conf.max_t": _set("data.spec_aug_max_t"),
    "dataset_conf.spec_aug_conf.num_f_mask": _set("data.spec_aug_num_f_mask"),
    "dataset_conf.spec_aug_conf.num_t_mask": _set("data.spec_aug_num_t_mask"),
    "dataset_conf.spec_sub": _set("data.spec_sub", convert=bool),
    "dataset_conf.spec_sub_conf.max_t": _set("data.spec_sub_max_t"),
    "dataset_conf.spec_sub_conf.num_t_sub": _set("data.spec_sub_num_t_sub"),
    "dataset_conf.spec_trim": _must(False),
    "dataset_conf.speed_perturb": _must(False),
    "dataset_conf.eod_id": _must(151643, "data.eod_token <|endoftext|> is 151643 in Qwen2's vocabulary"),
    "dataset_conf.split_num": _must(1, "one pass over the list per epoch"),
    "dataset_conf.multi_num": _must(1, "the list is read once per epoch"),
    "dataset_conf.prompt_conf_path": _unused("read by find_prompts: data.prompts"),
    "dataset_conf.continue_data": _set("train.resume_data", convert=bool),
    "decoder": _unused(NO_CTC),
    "encoder": _must("transformer"),
    "encoder_conf.activation_type": _must("gelu"),
    "encoder_conf.attention_dropout_rate": _must(0.0, "no dropout on attention probabilities"),
    "encoder_conf.attention_heads": _set("model.encoder.num_heads"),
    "encoder_conf.dropout_rate": _set("model.encoder.dropout", convert=float),
    # per-layer recomputation; the policy that keeps the weight matmuls (configs/osum_full.yaml, docs/training.md)
    "encoder_conf.gradient_checkpointing": _set("model.remat_policy",
                                                convert=lambda v: "dots_with_no_batch_dims_saveable" if v else "none"),
    "encoder_conf.input_layer": _must("conv1d2"),
    "encoder_conf.key_bias": _set("model.encoder.key_bias", convert=bool),
    "encoder_conf.linear_units": _set("model.encoder.ffn_dim"),
    "encoder_conf.normalize_before": _must(True),
    "encoder_conf.num_blocks": _set("model.encoder.num_layers"),
    "encoder_conf.output_size": _set("model.encoder.d_model"),
    "encoder_conf.pos_enc_layer_type": _must("abs_pos_whisper"),
    "encoder_conf.positional_dropout_rate": _set("model.encoder.positional_dropout", convert=float),
    "encoder_conf.static_chunk_size": _unused("full-context attention (use_dynamic_chunk is false)"),
    "encoder_conf.use_dynamic_chunk": _must(False, "full-context attention"),
    "encoder_conf.use_dynamic_left_chunk": _must(False, "full-context attention"),
    "grad_clip": _set("train.grad_clip", convert=float),
    "accum_grad": _set("train.grad_accum"),
    "input_dim": _set("model.encoder.num_mel_bins", "data.num_mel_bins"),
    "log_interval": _set("train.log_every"),
    "save_interval": _set("train.checkpoint_every"),
    "max_epoch": _set("data.num_epochs"),
    "model_conf.ctc_weight": _unused(NO_CTC),
    "model_conf.length_normalized_loss": _unused(NO_CTC),
    "model_conf.lsm_weight": _unused("the LLM loss is plain cross-entropy, no label smoothing (reference §3.1)"),
    "init_step": _unused("a run starts at step 0; weights come from train.init_from"),
}
PREFIX_UNUSED = {"decoder_conf.": NO_CTC}  # whole sections


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict) and tree:
        out = []
        for k, v in tree.items():
            out += _leaves(v, f"{prefix}{k}.")
        return out
    return [(prefix[:-1], tree)]


@dataclass
class Recipe:
    fields: dict  # {section: {key: value}} for config_from_dict
    sets: list  # (osum key, value, osum-jax keys)
    unused: list  # (osum key, value, reason)
    prompts: Path | None  # OSUM's prompt file, when found


def read_recipe(path: str | Path) -> Recipe:
    """Every key of OSUM's training YAML mapped through :data:`KEYS` (``ConfigError`` naming the file and key for a
    value this implementation cannot honour or a key it does not know)."""
    path = Path(path)
    try:
        y = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read OSUM's config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(y, dict) or "encoder_conf" not in y:
        raise ConfigError(f"{path}: not OSUM's training YAML (no encoder_conf)")
    fields: dict = {}
    sets, unused = [], []
    for key, value in _leaves(y):
        rule = KEYS.get(key)
        if rule is None:
            why = next((w for p, w in PREFIX_UNUSED.items() if key.startswith(p)), None)
            if why is None:
                raise ConfigError(f"{path}: {key}: not an OSUM key osum-jax knows, so it cannot be honoured "
                                  f"(remove it, or see osum_jax/osum_recipe.py)")
            unused.append((key, value, why))
            continue
        if rule.must is not _ANY:
            if value != rule.must or isinstance(value, bool) != isinstance(rule.must, bool):
                raise ConfigError(f"{path}: {key}: {value!r} cannot be honoured; osum-jax does {rule.must!r}"
                                  + (f" ({rule.unused})" if rule.unused else ""))
            unused.append((key, value, f"checked: {rule.unused or 'what osum-jax does'}"))
            continue
        if not rule.to:
            unused.append((key, value, rule.unused))
            continue
        try:
            converted = rule.convert(value)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: {key}: {value!r} cannot be honoured") from None
        values = converted if len(rule.to) > 1 and isinstance(converted, tuple) else (converted,) * len(rule.to)
        for dotted, v in zip(rule.to, values):
            section, *rest = dotted.split(".")
            node = fields.setdefault(section, {})
            for part in rest[:-1]:
                node = node.setdefault(part, {})
            node[rest[-1]] = v
        sets.append((key, value, rule.to))
    if "use_lora" in y and not y["use_lora"]:  # no LoRA: its rank, alpha and dropout do not apply
        fields.setdefault("model", {})["lora"] = {"rank": 0}
    rel = (y.get("dataset_conf") or {}).get("prompt_conf_path") or "conf/prompt_config.yaml"
    return Recipe(fields, sets, unused, find_prompts(path, rel))


def find_prompts(yaml_path: Path, rel: str) -> Path | None:
    """OSUM's prompt file: ``prompt_conf_path`` relative to OSUM's repository root (the YAML's parent folder,
    the way OSUM's scripts run), beside the YAML, or as given."""
    yaml_path = Path(yaml_path).resolve()
    for cand in (yaml_path.parent.parent / rel, yaml_path.parent / Path(rel).name, Path(rel)):
        if cand.is_file():
            return cand
    return None


def merge(a: dict, b: Mapping) -> dict:
    """``b`` merged into ``a`` (nested mappings key by key; ``a`` is changed and returned)."""
    for k, v in b.items():
        a[k] = merge(dict(a.get(k) or {}), v) if isinstance(v, Mapping) else v
    return a


def config_from_recipe(recipe: Recipe, base: dict, overrides: Sequence[str], source: str) -> Config:
    """``base`` (a config file's mapping: the model architecture and compute settings) + the recipe's fields +
    ``overrides``; the prompt file found beside OSUM's YAML becomes ``data.prompts`` unless base or overrides
    name one."""
    fields = merge(merge({}, base), recipe.fields)
    if recipe.prompts is not None and not (base.get("data") or {}).get("prompts"):
        fields.setdefault("data", {})["prompts"] = str(recipe.prompts)
    return config_from_dict(fields, overrides, source=source)


def describe(recipe: Recipe) -> str:
    """Lines naming every OSUM key: what it set, or why it is not used."""
    lines = [f"  {k} = {v!r} -> {', '.join(to)}" for k, v, to in recipe.sets]
    lines += [f"  {k} = {v!r}: not used ({why})" if not why.startswith("checked") else f"  {k} = {v!r}: {why}"
              for k, v, why in recipe.unused]
    return "\n".join(lines)
