"""Write an in-memory JAX :class:`~osum_jax.models.OSUM` as a PyTorch package for ``osum_torch_infer``.

The format is described in ``docs/package-format.md``. In short, a Hugging Face-style directory::

    config.json                      OSUM config (encoder, adapter, speech tokens, LoRA) + a Qwen2 config ("llm")
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json (<= 5 GB)
    adapter_config.json              only with merge_lora=False: peft LoRA config for the exported Qwen2
    adapter_model.safetensors        only with merge_lora=False: peft LoRA weights
    generation_config.json           OSUM's decoding defaults (reference section 8)
    processor_config.json            OSUMProcessor's settings: the mel front end, the prompt book, the pad id
    prompts.yaml                     the prompt file (OSUM prompt_config.yaml format)
    tokenizer.json ...               the tokenizer files, copied

Tensor names and the tensors' order come from the package's rule table (:mod:`.package_table`): the Whisper
encoder under ``encoder.`` (Hugging Face ``WhisperEncoder`` names), the adapter under ``adapter.``,
``speech_embed.weight`` and the LLM under ``llm.`` (Hugging Face ``Qwen2ForCausalLM`` names, the HF tables of
:mod:`.hf` read backwards).

The writer streams: the safetensors headers are computed from the variables' shapes first, then each tensor is
converted (one layer of a stacked variable at a time) and appended to its shard file. The output is written to a
temporary sibling directory, fsynced and renamed into place only when complete
(:func:`osum_torch_infer.files.atomic_file`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from osum_torch_infer.package import AdapterConfig as PkgAdapter
from osum_torch_infer.package import EncoderConfig as PkgEncoder
from osum_torch_infer.formats.preset import (PROCESSOR_FILE, SAFETENSORS_DTYPE, dtype_long, generation_file,
                                             mel_settings, processor_config)
from osum_torch_infer.formats.prompts import load_book
from osum_torch_infer.package import PackageConfig, PackageError

from ..checkpoint import atomic_output
from ..config import ModelConfig
from ..data.text import DEFAULT_PROMPTS
from .package_table import PackageTensor, plan_package
from .stream import Progress

MAX_SHARD_BYTES = 5 * 1000 ** 3  # Hugging Face's "5GB"
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model")
# the dtype names and the decoding preset are the contract's (osum_torch_infer.formats.preset); numpy's types here
NUMPY_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
                "float32": np.dtype(np.float32)}

class Fp16OverflowError(PackageError):
    """Some tensors hold values beyond the float16 range; ``offenders`` lists ``(name, max |value|)``."""

    def __init__(self, offenders: list[tuple[str, float]]):
        self.offenders = offenders
        lines = "\n  ".join(f"{name}: max |value| = {peak:.6g}" for name, peak in offenders)
        super().__init__(f"{len(offenders)} tensor(s) exceed the float16 range (|x| <= {FP16_MAX:g}); nothing was "
                         f"written. Export with --dtype bf16 or fp32, or fix these tensors:\n  {lines}")


def _resolve_dtype(dtype: str) -> str:
    try:
        return dtype_long(dtype)
    except ValueError:
        raise PackageError(f"dtype {dtype!r} is not one of bf16, fp16, fp32") from None


def _shards(tensors: list[PackageTensor], itemsize: int, max_shard_bytes: int) -> list[list[PackageTensor]]:
    shards: list[list[PackageTensor]] = [[]]
    size = 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _header(tensors: list[PackageTensor], st_dtype: str, itemsize: int) -> bytes:
    """safetensors header (8-byte little-endian length + JSON padded with spaces to a multiple of 8)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        meta[t.name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _bands(arr: np.ndarray, band_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """Row bands of ``arr`` of about ``band_bytes`` in float32: a large tensor (the 152k x 3584 embedding) is
    converted and written piece by piece instead of as whole float32 / target-dtype / bytes copies."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        yield arr
        return
    rows = max(1, band_bytes // max(4, 4 * (arr.size // arr.shape[0])))
    for lo in range(0, arr.shape[0], rows):
        yield arr[lo:lo + rows]


def _write_shards(directory: Path, stem: str, shards: list[list[PackageTensor]], np_dt: np.dtype, st_dtype: str,
                  check_fp16: bool, offenders: list[tuple[str, float]], progress: Progress,
                  always_single: bool = False) -> dict[str, str]:
    """Write the shard files; returns ``{tensor name: file name}``. With fp16 overflow nothing more is written."""
    itemsize = np_dt.itemsize
    weight_map: dict[str, str] = {}
    n = len(shards)
    for s, tensors in enumerate(shards):
        fname = f"{stem}.safetensors" if n == 1 or always_single else f"{stem}-{s + 1:05d}-of-{n:05d}.safetensors"
        with open(directory / fname, "wb") as f:
            f.write(_header(tensors, st_dtype, itemsize))
            for t in tensors:
                arr = np.asarray(t.produce())  # in its stored dtype; converted band by band below
                if arr.shape != t.shape:
                    raise PackageError(f"{t.name}: produced shape {arr.shape} != planned {t.shape}")
                # one pass: convert, check and (while no fp16 offender is known) write each band; an overflow
                # fails the whole export, whose temporary directory is then removed
                peak = 0.0
                for band in _bands(arr):
                    band = np.asarray(band, np.float32)
                    if not np.isfinite(band).all():
                        raise PackageError(f"{t.name}: the model holds NaN/Inf values; refusing to export them")
                    if check_fp16 and band.size:
                        peak = max(peak, float(np.abs(band).max()))
                    if not offenders and peak <= FP16_MAX:
                        f.write(band.astype(np_dt).tobytes())
                if check_fp16 and peak > FP16_MAX:
                    offenders.append((t.name, peak))
                progress.bytes(arr.size * itemsize)
                progress.tensor()
                if offenders:  # keep scanning to report every offender
                    continue
                weight_map[t.name] = fname
    return weight_map


def qwen2_hf_config(cfg: ModelConfig, torch_dtype: str, eos_token_id: int) -> dict:
    """A ``transformers.Qwen2Config`` dict for the LLM part (loadable with ``Qwen2Config(**d)``)."""
    llm = cfg.llm
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "head_dim": llm.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_theta": llm.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": llm.rms_norm_eps,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": llm.initializer_range,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
    }


def _tokenizer_eos(tokenizer_dir: Path, eod_token: str) -> int:
    from tokenizers import Tokenizer

    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        raise PackageError(f"no tokenizer.json in {tokenizer_dir} (a local Hugging Face tokenizer directory is "
                           f"needed)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise PackageError(f"cannot read {file}: {e}") from None
    eos = tok.token_to_id(eod_token)
    if eos is None:
        raise PackageError(f"{file} has no end-of-text token {eod_token!r}")
    return int(eos)


def export_torch_package(model, cfg: ModelConfig, out_dir: str | Path, *, tokenizer_dir: str | Path,
                         prompts_path: str | Path | None = None, dtype: str = "bf16", merge_lora: bool = True,
                         force: bool = False, eod_token: str = "<|endoftext|>",
                         max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True,
                         extra_metadata: dict | None = None) -> dict:
    """Write ``model`` (an :class:`osum_jax.models.OSUM`) as a torch package directory ``out_dir``.

    ``dtype``: ``bf16`` | ``fp16`` | ``fp32`` (LoRA merges are computed in float32 before the cast). With
    ``merge_lora=False`` the base weights go to the model files and the adapters to ``adapter_model.safetensors``
    in peft format. fp16 exports check every tensor against the float16 range first; offenders are listed in a
    :class:`Fp16OverflowError` and nothing is written. Refuses to replace an existing ``out_dir`` unless
    ``force``. Returns a summary dict (files, tensor counts, bytes).
    """
    torch_dtype = _resolve_dtype(dtype)
    st_dtype, np_dt = SAFETENSORS_DTYPE[torch_dtype], NUMPY_DTYPES[torch_dtype]
    fp16 = torch_dtype == "float16"
    out = Path(out_dir)
    tok_dir = Path(tokenizer_dir)
    if out.exists() and not force:
        raise PackageError(f"{out} exists; --force (force=True) replaces it")
    if max_shard_bytes < 1:
        raise PackageError("max_shard_bytes must be positive")
    eos_id = _tokenizer_eos(tok_dir, eod_token)
    prompts_file = Path(prompts_path) if prompts_path else DEFAULT_PROMPTS
    try:
        prompts = load_book(prompts_file)  # validates the file (raises naming it)
    except ValueError as e:
        raise PackageError(str(e)) from None
    if not cfg.lora.enabled:
        merge_lora = True  # nothing to keep apart

    tensors = plan_package(model, cfg, merge_lora)
    base = [t for t in tensors if t.file == "model"]
    adapters = [t for t in tensors if t.file == "adapter"]
    shards = _shards(base, np_dt.itemsize, max_shard_bytes)
    total_bytes = sum(math.prod(t.shape) for t in tensors) * np_dt.itemsize

    out.parent.mkdir(parents=True, exist_ok=True)
    bar = Progress("export-torch", total_bytes, len(tensors), progress)
    with contextlib.closing(bar), atomic_output(out, force=True) as tmp:  # refused above unless force
        tmp.mkdir()
        offenders: list[tuple[str, float]] = []
        weight_map = _write_shards(tmp, "model", shards, np_dt, st_dtype, fp16, offenders, bar)
        if adapters:
            _write_shards(tmp, "adapter_model", [adapters], np_dt, st_dtype, fp16, offenders, bar,
                          always_single=True)
        if offenders:
            raise Fp16OverflowError(offenders)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(math.prod(t.shape) for t in base) * np_dt.itemsize},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if adapters:
            lora = cfg.lora
            adapter_cfg = {
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False,
                "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
                "use_rslora": False, "use_dora": False,
            }
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        drop = ("dropout", "positional_dropout")  # training-only settings
        mel = mel_settings(cfg.encoder.num_mel_bins, 2 * cfg.encoder.max_source_positions)
        config = PackageConfig(
            encoder=PkgEncoder(**_plain(asdict(cfg.encoder), drop)),
            adapter=PkgAdapter(**_plain(asdict(cfg.adapter), drop)),
            text_config=qwen2_hf_config(cfg, torch_dtype, eos_id), speech_token_num=cfg.speech_token_num,
            eos_token_id=eos_id, torch_dtype=torch_dtype,
            lora={"merged": merge_lora, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                  "targets": list(cfg.lora.targets)},
            prompts_file="prompts.yaml", eod_token=eod_token,
            audio=mel, metadata=dict(extra_metadata or {}))
        config.write(tmp / "config.json")
        (tmp / "generation_config.json").write_text(json.dumps(generation_file(eos_id), indent=2) + "\n")
        # what AutoProcessor.from_pretrained(out) reads: the front end, the prompt book, the pad id
        (tmp / PROCESSOR_FILE).write_text(json.dumps(processor_config(mel, prompts, eos_id, eod_token), indent=2,
                                                     ensure_ascii=False) + "\n", encoding="utf-8")
        shutil.copyfile(prompts_file, tmp / "prompts.yaml")
        copied = []
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
                copied.append(name)
    files = sorted(p.name for p in out.iterdir())
    return {"out": str(out), "files": files, "tensors": len(tensors), "bytes": total_bytes,
            "shards": len(shards), "dtype": torch_dtype, "merged_lora": merge_lora, "tokenizer_files": copied}


def _plain(d: dict, drop: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in d.items() if k not in drop}




