"""``osum-convert import-hf``: HF Whisper (encoder) + HF Qwen2 -> JAX checkpoint with a fresh adapter and LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from .. import checkpoint as ck
from ..checkpoint.tree import CheckpointMismatch, flat_variables
from ..config import Config
from .hf import match_qwen2, match_whisper
from .osum_layout import canonical_layout, fresh_extras
from .rules import shape_problems
from .sources import SafetensorsSource, SourceError, np_dtype
from .stream import (
    Progress,
    array_leaf,
    streamed_leaf,
    sum_bytes,
    write_checkpoint_atomic,
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise SourceError(f"{path}: invalid JSON ({e})") from None


def whisper_fields(whisper_dir: Path) -> dict[str, Any]:
    """``model.encoder.*`` implied by a HF Whisper ``config.json``."""
    w = read_json(Path(whisper_dir) / "config.json")
    try:
        return {"num_mel_bins": w["num_mel_bins"], "d_model": w["d_model"], "num_layers": w["encoder_layers"],
                "num_heads": w["encoder_attention_heads"], "ffn_dim": w["encoder_ffn_dim"],
                "max_source_positions": w["max_source_positions"]}
    except KeyError as e:
        raise SourceError(f"{whisper_dir}/config.json: no {e.args[0]!r} (is this a Whisper checkpoint?)") from None


def hf_model_fields(whisper_dir: Path, qwen2_dir: Path) -> dict[str, Any]:
    """Config fields implied by the HF ``config.json`` files (``model.encoder.*`` and ``model.llm.*``)."""
    from .osum_config import qwen2_fields

    return {"encoder": whisper_fields(whisper_dir), "llm": qwen2_fields(qwen2_dir)}


def _hf_config(whisper_dir, qwen2_dir, config, overrides, osum_config=None) -> tuple[Config, dict[str, Any]]:
    """The config from ``config`` (or the HF files + OSUM's YAML), checked against every source; and the
    sources' origins (path, SHA-256) for the checkpoint's layout."""
    from .osum_config import config_from_sources, osum_yaml_fields, qwen2_config_path, sha256

    wjson, qjson = Path(whisper_dir) / "config.json", qwen2_config_path(qwen2_dir)
    sources = [(str(wjson), {"model": {"encoder": whisper_fields(whisper_dir)}}),
               (str(qjson), {"model": {"llm": hf_model_fields(whisper_dir, qwen2_dir)["llm"]}})]
    origin: dict[str, Any] = {}
    if osum_config is not None:
        # OSUM's model YAML names the adapter, LoRA and speech-token settings the HF files cannot know
        sources.append((str(osum_config), osum_yaml_fields(osum_config)))
        origin["osum_config"] = {"path": str(Path(osum_config).resolve()), "sha256": sha256(osum_config)}
    return config_from_sources(config, overrides, sources), origin


def _fresh_parts(cfg: Config, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Adapter, bos/eos table and LoRA adapters initialised as the model does (LoRA B = 0)."""
    from ..models import Adapter

    m = cfg.model
    rngs = nnx.Rngs(seed)
    adapter = Adapter(m.encoder.d_model, m.llm.hidden_size, m.adapter, dtype=m.dtype, param_dtype=m.param_dtype,
                      rngs=rngs)
    out = {f"adapter.{k}": np.asarray(v.get_value()) for k, v in flat_variables(adapter).items()}
    pdt = np_dtype(m.param_dtype)
    key = jax.random.key(seed + 1)
    k_speech, k_lora = jax.random.split(key)
    out["speech_embed"] = np.asarray(m.llm.initializer_range * jax.random.normal(
        k_speech, shapes["speech_embed"], np.float32)).astype(pdt)
    for i, path in enumerate(sorted(p for p in shapes if p.endswith((".lora_a", ".lora_b")))):
        shape = shapes[path]
        if path.endswith(".lora_b"):
            out[path] = np.zeros(shape, pdt)
        else:  # peft / lora.py: A ~ U(-1/sqrt(in), 1/sqrt(in)), shape [layers, in, r]
            bound = 1.0 / math.sqrt(shape[-2])
            out[path] = np.asarray(jax.random.uniform(jax.random.fold_in(k_lora, i), shape, np.float32,
                                                      -bound, bound)).astype(pdt)
    return out


def import_hf(whisper: str | Path, qwen2: str | Path, config: str | Path | None = None,
              overrides: Sequence[str] = (), *, out: str | Path, force: bool = False, seed: int = 0,
              progress: bool = True, osum_config: str | Path | None = None,
              prompts: str | Path | None = None) -> dict[str, Any]:
    """HF Whisper (encoder only) + HF Qwen2 -> JAX checkpoint with a fresh adapter, bos/eos and LoRA (B = 0).

    Without ``config`` the encoder/LLM sections come from the HF ``config.json`` files and the adapter, LoRA
    and speech-token settings from ``osum_config`` (OSUM's model YAML; OSUM's defaults without it); with a
    ``config``, its values must agree with every one of those files (a list of differences otherwise).
    ``prompts`` (OSUM's ``prompt_config.yaml`` format) is stored with the checkpoint, as import-osum does.
    """
    cfg, origin = _hf_config(Path(whisper), Path(qwen2), config, overrides, osum_config)
    from .osum_config import import_output

    out, book = import_output(out, force, prompts, origin)
    shapes = ck.model_shapes(cfg)
    w_src, q_src = SafetensorsSource(whisper), SafetensorsSource(qwen2)
    enc = cfg.model.encoder
    w = match_whisper(w_src.keys(), enc.num_layers, key_bias=enc.key_bias, source=str(whisper))
    q = match_qwen2(q_src.keys(), cfg.model.llm, None, source=str(qwen2))  # LoRA starts fresh
    w_leaves = {f"encoder.{p}": items for p, items in w.leaves.items()}
    q_leaves = {f"llm.{p}": items for p, items in q.leaves.items()}
    problems = w.problems + q.problems
    problems += shape_problems(w_leaves, w_src.shape, shapes, source=str(whisper))
    problems += shape_problems(q_leaves, q_src.shape, shapes, source=str(qwen2))
    dtypes = {}
    for src, leaves in ((w_src, w_leaves), (q_src, q_leaves)):
        for path, items in leaves.items():
            kinds = sorted({src.dtype(k) for k, _ in items})
            if len(kinds) > 1:
                problems.append(f"{path}: layers stored with different dtypes {kinds}")
            dtypes[path] = kinds[0]
    if problems:
        raise CheckpointMismatch("HF checkpoints do not match the config:\n  " + "\n  ".join(problems))

    fresh = _fresh_parts(cfg, shapes, seed)
    extras_np = fresh_extras(cfg, seed)
    covered = set(w_leaves) | set(q_leaves) | set(fresh)
    if covered != set(shapes):
        raise CheckpointMismatch(f"internal: variables not covered {sorted(set(shapes) - covered)}")
    n_tensors = sum(len(v) for v in w_leaves.values()) + sum(len(v) for v in q_leaves.values()) + len(fresh) \
        + len(extras_np)
    bar = Progress("import-hf", 0, n_tensors, progress)
    params = {}
    for src, leaves in ((w_src, w_leaves), (q_src, q_leaves)):
        for path, items in leaves.items():
            params[path] = streamed_leaf(src, items, shapes[path], dtypes[path], bar)
    params.update({p: array_leaf(a, bar) for p, a in fresh.items()})
    extras = {k: array_leaf(a, bar) for k, a in extras_np.items()}
    total = sum_bytes(params) + sum_bytes(extras)
    if bar.bar is not None:
        bar.bar.total = total
    # the OSUM key list this checkpoint exports to (canonical order, peft >= 0.7 names)
    layout_keys = canonical_layout(cfg, {p: v.dtype for p, v in params.items()}, extras_np)
    layout = {"source": {"kind": "hf", "whisper": str(Path(whisper).resolve()), "qwen2": str(Path(qwen2).resolve()),
                         **origin},
              "keys": layout_keys}
    try:
        write_checkpoint_atomic(out, force, params, cfg, extras, layout, bar, prompts=book)
    finally:
        bar.close()
    return {"tensors": n_tensors, "bytes": total}
