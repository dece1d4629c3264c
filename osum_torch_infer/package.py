"""The torch package's ``config.json``: one schema that the exporter writes and the runtime reads.

Torch-free and JAX-free (the contract): ``osum_jax.convert.torch_package`` builds an :class:`OSUMConfig` and
writes ``to_dict()``; ``osum_torch_infer.modeling`` reads it with :meth:`OSUMConfig.from_json`. Format:
docs/package-format.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_NAME = "osum-torch-package"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


class PackageError(ValueError):
    """A package directory is incomplete or inconsistent (the message names the file and key)."""


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
class OSUMConfig:
    encoder: EncoderConfig
    adapter: AdapterConfig
    llm: dict  # a transformers Qwen2Config dict
    speech_token_num: int = 4097
    eos_token_id: int = 151643
    torch_dtype: str = "bfloat16"
    lora: dict = field(default_factory=dict)
    prompts_file: str = "prompts.yaml"
    eod_token: str = "<|endoftext|>"
    audio: dict = field(default_factory=dict)  # front-end settings: sample_rate, n_fft, hop_length, mel bins
    metadata: dict = field(default_factory=dict)  # provenance (source checkpoint, ...)
    raw: dict = field(default_factory=dict)  # the file as read

    def to_dict(self) -> dict:
        """What ``config.json`` holds (``raw`` excluded)."""
        def plain(d):
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_type": "osum",
               "architectures": ["OSUMForConditionalGeneration"], "torch_dtype": self.torch_dtype,
               "encoder": plain(asdict(self.encoder)), "adapter": plain(asdict(self.adapter)),
               "speech_token_num": self.speech_token_num, "lora": dict(self.lora), "llm": dict(self.llm),
               "eos_token_id": self.eos_token_id, "eod_token": self.eod_token, "prompts_file": self.prompts_file,
               "audio": dict(self.audio)}
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: Path) -> "OSUMConfig":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PackageError(f"cannot read {path}: {e}") from None
        if data.get("format") != FORMAT_NAME:
            raise PackageError(f"{path}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r} "
                               f"(write packages with `osum-convert export-torch`)")
        if data.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise PackageError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                               f"(this runtime reads {SUPPORTED_FORMAT_VERSIONS})")
        for key in ("encoder", "adapter", "llm", "speech_token_num", "eos_token_id"):
            if key not in data:
                raise PackageError(f"{path}: missing key {key!r}")

        def build(dc, d, where):
            names = {f for f in dc.__dataclass_fields__}
            unknown = sorted(set(d) - names)
            if unknown:
                raise PackageError(f"{path}: unknown key(s) {unknown} in {where!r}")
            kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
            return dc(**kw)

        return cls(encoder=build(EncoderConfig, data["encoder"], "encoder"),
                   adapter=build(AdapterConfig, data["adapter"], "adapter"), llm=dict(data["llm"]),
                   speech_token_num=int(data["speech_token_num"]), eos_token_id=int(data["eos_token_id"]),
                   torch_dtype=data.get("torch_dtype", "bfloat16"), lora=dict(data.get("lora", {})),
                   prompts_file=data.get("prompts_file", "prompts.yaml"),
                   eod_token=data.get("eod_token", "<|endoftext|>"), audio=dict(data.get("audio", {})),
                   metadata=dict(data.get("metadata", {})), raw=data)


