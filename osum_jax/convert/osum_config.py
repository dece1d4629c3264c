"""The project config from OSUM's own files: its model YAML (``conf/config_llm_huawei_base-version.yaml``) and the
Qwen2 ``config.json``, checked against what the user gave.

Every hyperparameter that does not show in a tensor shape (LoRA alpha/dropout, attention and KV heads, head dim,
rope theta, norm eps, activations, adapter type and strides, ...) imports silently if it is wrong, and changes the
logits. So the values these files imply are compared with the final config (``--config`` + ``key=value``); any
difference is one error listing each key with both values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import Config, ConfigError

from ..config_loading import config_from_dict, load_config
from ..osum_recipe import merge
from .sources import SourceError


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SourceError(f"{path}: invalid {what} ({e})") from None


def qwen2_config_path(path: str | Path) -> Path:
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def qwen2_fields(path: str | Path) -> dict[str, Any]:
    """``model.llm.*`` from a Qwen2 checkpoint directory or its ``config.json``."""
    f = qwen2_config_path(path)
    q = _read(f, "Qwen2 config.json")
    if not isinstance(q, dict):
        raise SourceError(f"{f}: expected a JSON object")
    if q.get("model_type") not in (None, "qwen2"):
        raise SourceError(f"{f}: model_type {q.get('model_type')!r}, expected 'qwen2'")
    if q.get("hidden_act", "silu") != "silu":
        raise SourceError(f"{f}: hidden_act {q.get('hidden_act')!r}; the Qwen2 MLP here is SiLU-gated")
    try:
        rope = q.get("rope_theta", (q.get("rope_parameters") or {}).get("rope_theta"))
        llm = {"vocab_size": q["vocab_size"], "hidden_size": q["hidden_size"],
               "intermediate_size": q["intermediate_size"], "num_layers": q["num_hidden_layers"],
               "num_heads": q["num_attention_heads"],
               "num_kv_heads": q.get("num_key_value_heads", q["num_attention_heads"]),
               "head_dim": q.get("head_dim") or q["hidden_size"] // q["num_attention_heads"],
               "rms_norm_eps": q["rms_norm_eps"], "tie_word_embeddings": bool(q.get("tie_word_embeddings", False))}
    except KeyError as e:
        raise SourceError(f"{f}: no {e.args[0]!r} (is this a Qwen2 config?)") from None
    if rope is not None:
        llm["rope_theta"] = float(rope)
    return llm


def osum_yaml_fields(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{"model": ..., "train": ..., "data": ...}`` fields implied by OSUM's model YAML; ``SourceError`` for a
    setting this implementation does not have (naming the key)."""
    f = Path(path)
    y = _read(f, "OSUM config")
    if not isinstance(y, dict):
        raise SourceError(f"{f}: expected a mapping")

    def need(cond: bool, key: str, value: Any, want: str) -> None:
        if not cond:
            raise SourceError(f"{f}: {key}: {value!r} is not supported (OSUM's model has {want})")

    enc = y.get("encoder_conf") or {}
    if not enc:
        raise SourceError(f"{f}: no encoder_conf (is this OSUM's model YAML?)")
    need(enc.get("activation_type", "gelu") == "gelu", "encoder_conf.activation_type", enc.get("activation_type"),
         "gelu")
    need(enc.get("input_layer", "conv1d2") == "conv1d2", "encoder_conf.input_layer", enc.get("input_layer"),
         "conv1d2")
    need(enc.get("pos_enc_layer_type", "abs_pos_whisper") == "abs_pos_whisper", "encoder_conf.pos_enc_layer_type",
         enc.get("pos_enc_layer_type"), "abs_pos_whisper")
    need(enc.get("normalize_before", True) is True, "encoder_conf.normalize_before", enc.get("normalize_before"),
         "true")
    encoder = {"num_mel_bins": y.get("input_dim", 80), "d_model": enc.get("output_size", 1024),
               "num_heads": enc.get("attention_heads", 16), "ffn_dim": enc.get("linear_units", 4096),
               "num_layers": enc.get("num_blocks", 24), "key_bias": bool(enc.get("key_bias", True)),
               "dropout": float(enc.get("dropout_rate", 0.1)),
               "positional_dropout": float(enc.get("positional_dropout_rate", 0.1))}
    adapter_type, rate = y.get("adapter_type", "gxl"), y.get("downsample_rate", 4)
    need(adapter_type == "gxl", "adapter_type", adapter_type, "gxl")
    need(rate == 4, "downsample_rate", rate, "4 (conv strides 1, 2, 2)")
    use_lora = bool(y.get("use_lora", False))
    lora = {"rank": int(y.get("lora_rank", 8)) if use_lora else 0}
    if use_lora:
        lora.update(alpha=float(y.get("lora_alpha", 32)), dropout=float(y.get("lora_dropout", 0.1)))
    model = {"encoder": encoder, "adapter": {"conv_strides": (1, 2, 2)}, "lora": lora}
    if "speech_token_num" in y:
        model["speech_token_num"] = int(y["speech_token_num"])
    train: dict[str, Any] = {}
    if "fire_module" in y:
        train["fire_module"] = y["fire_module"]
    data: dict[str, Any] = {}
    ds = y.get("dataset_conf") or {}
    fc = ds.get("filter_conf") or {}
    for ours, theirs in (("max_frames", "max_length"), ("max_label_tokens", "token_max_length"),
                         ("min_label_tokens", "token_min_length"), ("max_seq_len", "max_seq_len"),
                         ("filter_no_extra_info", "filter_no_extra_info")):
        if theirs in fc:
            data[ours] = fc[theirs]
    return {"model": model, "train": train, "data": data}


def _leaves(tree: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _get(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def config_from_sources(config: str | Path | None, overrides: Sequence[str], sources: Sequence[tuple[str, dict]]
                        ) -> Config:
    """The final config (``config`` or the defaults plus the sources' fields, then ``overrides``), after checking
    that its model agrees with every ``model.*`` field each source implies. ``sources``: ``(file name, {section:
    {key: value}})``. The sources' training and data settings (OSUM's filters, ``fire_module``) fill the config
    only when no ``config`` is given; with one, they are the config's business."""
    fields: dict = {}
    for _, f in sources:
        merge(fields, f)
    if config is None:
        cfg = config_from_dict(fields, overrides, source=" + ".join(name for name, _ in sources))
        where = "the overrides"
    else:
        cfg = load_config(config, overrides)
        where = str(config) + (" + overrides" if overrides else "")
    bad = []
    for name, f in sources:
        for key, want in _leaves({"model": f.get("model", {})}):
            have = _get(cfg, key)
            if key == "model.llm.head_dim":
                have = cfg.model.llm.resolved_head_dim
            if isinstance(want, (list, tuple)):
                want, have = tuple(want), tuple(have)
            same = math.isclose(float(have), float(want), rel_tol=1e-9) if isinstance(want, float) else have == want
            if not same:
                bad.append(f"{key}: {where} has {have!r}, {name} has {want!r}")
    if bad:
        raise ConfigError("the config does not match the source files (non-shape settings change the logits "
                          "silently):\n  " + "\n  ".join(bad))
    return cfg


def prompt_book_item(prompts: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """OSUM's ``prompt_config.yaml`` as the checkpoint's ``prompts`` item, and its origin (path, SHA-256)."""
    from ..data.text import PromptBook

    book = PromptBook.load(prompts)  # validates (raises naming the file)
    origin = {"path": str(Path(prompts).resolve()), "sha256": sha256(prompts)}
    return ({"format": "osum-prompts/1", "source": origin["path"], "sha256": origin["sha256"],
             "prompts": book.prompts}, origin)


def import_output(out: str | Path, force: bool, prompts: str | Path | None,
                  origin: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """What import-hf and import-osum check before reading any tensor: the prompt book item (``None`` without
    ``prompts``; its origin goes to ``origin["prompts"]``), then that ``out`` is free unless ``force``."""
    book = None
    if prompts is not None:
        book, origin["prompts"] = prompt_book_item(prompts)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    return out, book
