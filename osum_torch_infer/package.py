"""The torch package's ``config.json``: one schema that the exporter writes and the runtime reads.

Torch-free and JAX-free (the contract): ``osum_jax.convert.torch_package`` builds a :class:`PackageConfig` and
writes ``to_dict()``; the runtime reads it with :meth:`PackageConfig.from_json` and turns it into the transformers
config class (:mod:`osum_torch_infer.configuration_osum`), which writes through :meth:`PackageConfig.to_dict`.
Format: docs/package-format.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_NAME = "osum-torch-package"
FORMAT_VERSION = 2  # 2: the LLM config under "text_config" (transformers' name); 1: under "llm"
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MODEL_TYPE = "osum"  # transformers AutoConfig / AutoModel name (osum_torch_infer registers it)
ARCHITECTURE = "OSUMForConditionalGeneration"


class PackageError(ValueError):
    """A package cannot be written or read: an existing output, a bad tokenizer, float16 overflow, an incomplete or
    inconsistent directory (the message names the file and key). The one class: the exporter
    (``osum_jax.convert``) and the runtime raise it."""


@dataclass(frozen=True)
class EncoderConfig:
    """The Whisper-medium encoder's architecture (defaults: OSUM's)."""

    num_mel_bins: int = 80
    d_model: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    # sinusoid table length; the encoder accepts at most 2 * max_source_positions mel frames (30 s)
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5
    key_bias: bool = False  # Whisper's k projection has no bias


@dataclass(frozen=True)
class AdapterConfig:
    """OSUM's link: causal convs, a small transformer, a projection (defaults: OSUM's)."""

    conv_kernel: int = 3
    conv_strides: tuple[int, ...] = (1, 2, 2)
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 2560
    activation: str = "relu"  # wenet's default; OSUM never sets it (unlike the encoder's GELU)
    max_positions: int = 5000  # ESPnet positional table length
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class PackageConfig:
    """``config.json`` of a package, as the exporter writes it and the runtime reads it.

    ``text_config`` is a ``transformers.Qwen2Config`` dict; :class:`osum_torch_infer.configuration_osum.OSUMConfig`
    (the ``transformers`` config class, ``model_type`` ``"osum"``) is built from this and serialises through it."""

    encoder: EncoderConfig
    adapter: AdapterConfig
    text_config: dict  # a transformers Qwen2Config dict
    speech_token_num: int = 4097
    eos_token_id: int = 151643
    torch_dtype: str = "bfloat16"
    lora: dict = field(default_factory=dict)
    prompts_file: str = "prompts.yaml"
    eod_token: str = "<|endoftext|>"
    audio: dict = field(default_factory=dict)  # front-end settings: sample_rate, n_fft, hop_length, mel bins
    metadata: dict = field(default_factory=dict)  # provenance (source checkpoint, ...)

    def to_dict(self) -> dict:
        def plain(d):
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

        text = {"model_type": "qwen2", **{k: v for k, v in self.text_config.items()
                                          if k not in ("architectures", "torch_dtype", "dtype")}}
        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_type": MODEL_TYPE,
               "architectures": [ARCHITECTURE], "torch_dtype": self.torch_dtype,
               "encoder": plain(asdict(self.encoder)), "adapter": plain(asdict(self.adapter)),
               "speech_token_num": self.speech_token_num, "lora": dict(self.lora), "text_config": text,
               "eos_token_id": self.eos_token_id, "eod_token": self.eod_token, "prompts_file": self.prompts_file,
               "audio": dict(self.audio)}
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: Path) -> "PackageConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PackageError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise PackageError(f"{path}: expected a JSON object")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config.json") -> "PackageConfig":
        """Validate and read a ``config.json`` dict (format 1's ``llm`` key is read as ``text_config``)."""
        if data.get("format") != FORMAT_NAME:
            raise PackageError(f"{where}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r} "
                               f"(write packages with `osum-convert export-torch`)")
        version = data.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise PackageError(f"{where}: format_version {version!r} is not supported "
                               f"(this runtime reads {SUPPORTED_FORMAT_VERSIONS})")
        text_key = "llm" if version == 1 else "text_config"
        for key in ("encoder", "adapter", text_key, "speech_token_num", "eos_token_id"):
            if key not in data:
                raise PackageError(f"{where}: missing key {key!r}")
        unknown = sorted(set(data) - KNOWN_KEYS - {text_key})
        if unknown:
            raise PackageError(f"{where}: unknown key(s) {unknown}")

        def build(dc, d, name):
            if isinstance(d, dc):
                return d
            if not isinstance(d, dict):
                raise PackageError(f"{where}: {name!r} must be an object")
            bad = sorted(set(d) - set(dc.__dataclass_fields__))
            if bad:
                raise PackageError(f"{where}: unknown key(s) {bad} in {name!r}")
            return dc(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

        text = data[text_key]
        if not isinstance(text, dict):
            raise PackageError(f"{where}: {text_key!r} must be an object")
        dtype = data.get("torch_dtype", data.get("dtype", "bfloat16"))
        return cls(encoder=build(EncoderConfig, data["encoder"], "encoder"),
                   adapter=build(AdapterConfig, data["adapter"], "adapter"), text_config=dict(text),
                   speech_token_num=int(data["speech_token_num"]), eos_token_id=int(data["eos_token_id"]),
                   torch_dtype=str(dtype).replace("torch.", ""), lora=dict(data.get("lora") or {}),
                   prompts_file=data.get("prompts_file", "prompts.yaml"),
                   eod_token=data.get("eod_token", "<|endoftext|>"), audio=dict(data.get("audio") or {}),
                   metadata=dict(data.get("metadata") or {}))


# every key of the current format, plus what transformers' save_pretrained adds
KNOWN_KEYS = {f for f in PackageConfig.__dataclass_fields__} | {
    "format", "format_version", "model_type", "architectures", "dtype", "transformers_version"}



def read_prompts(root: str | Path, prompts_file: str = "prompts.yaml") -> dict[str, list[str]]:
    """A package's prompt book: ``{normalised task: [prompts]}`` (:mod:`osum_torch_infer.formats.prompts`;
    :class:`PackageError` naming the file)."""
    from .formats.prompts import load_book

    try:
        return load_book(Path(root) / prompts_file)
    except ValueError as e:
        raise PackageError(str(e)) from None
