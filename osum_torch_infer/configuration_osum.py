"""``OSUMConfig``: the transformers config class of an OSUM package (``model_type`` ``"osum"``).

As Qwen2-Audio's config: the audio side (``encoder``, ``adapter``: Whisper-medium encoder and OSUM's link) beside a
``Qwen2Config`` ``text_config``. Reading and writing go through the package schema
(:class:`osum_torch_infer.package.PackageConfig`), so ``config.json`` has one definition; importing
:mod:`osum_torch_infer.modeling` registers the class with ``AutoConfig`` (never ``trust_remote_code``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from transformers import PreTrainedConfig, Qwen2Config
from transformers.configuration_utils import SubConfigSpec

from .package import MODEL_TYPE, AdapterConfig, EncoderConfig, PackageConfig, PackageError


class OSUMConfig(PreTrainedConfig):
    """``encoder`` / ``adapter``: :class:`EncoderConfig` / :class:`AdapterConfig` (dicts accepted);
    ``text_config``: a ``Qwen2Config`` (or its dict; ``llm=`` is accepted as an alias)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=Qwen2Config)}

    encoder: Any = None
    adapter: Any = None
    text_config: dict | PreTrainedConfig | None = None
    speech_token_num: int = 4097
    eos_token_id: int = 151643
    lora: dict | None = None
    prompts_file: str = "prompts.yaml"
    eod_token: str = "<|endoftext|>"
    audio: dict | None = None
    metadata: dict | None = None

    def __post_init__(self, **kwargs):
        if "llm" in kwargs and self.text_config is None:
            self.text_config = kwargs.pop("llm")
        for key in ("format", "format_version"):  # the schema's, checked by PackageConfig.from_dict
            kwargs.pop(key, None)
        if isinstance(self.text_config, dict):
            self.text_config = {k: v for k, v in self.text_config.items()
                                if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
        self.encoder = _dataclass(EncoderConfig, self.encoder, "encoder")
        self.adapter = _dataclass(AdapterConfig, self.adapter, "adapter")
        self.lora, self.audio, self.metadata = dict(self.lora or {}), dict(self.audio or {}), dict(self.metadata or {})
        super().__post_init__(**kwargs)

    # -- the package schema ---------------------------------------------------------------------------------

    @classmethod
    def from_package(cls, pkg: PackageConfig) -> "OSUMConfig":
        return cls(encoder=pkg.encoder, adapter=pkg.adapter, text_config=dict(pkg.text_config),
                   speech_token_num=pkg.speech_token_num, eos_token_id=pkg.eos_token_id, torch_dtype=pkg.torch_dtype,
                   lora=pkg.lora, prompts_file=pkg.prompts_file, eod_token=pkg.eod_token, audio=pkg.audio,
                   metadata=pkg.metadata)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """What ``AutoConfig.from_pretrained`` calls: validated by the package schema first."""
        pkg = PackageConfig.from_dict(config_dict)
        return super().from_dict(pkg.to_dict(), **kwargs)

    def to_package(self) -> PackageConfig:
        text = {k: v for k, v in self.text_config.to_dict().items()
                if not k.startswith("_") and k not in ("transformers_version", "id2label", "label2id")}
        return PackageConfig(encoder=self.encoder, adapter=self.adapter, text_config=text,
                             speech_token_num=int(self.speech_token_num), eos_token_id=int(self.eos_token_id),
                             torch_dtype=self.torch_dtype, lora=dict(self.lora), prompts_file=self.prompts_file,
                             eod_token=self.eod_token, audio=dict(self.audio), metadata=dict(self.metadata))

    def to_dict(self) -> dict[str, Any]:
        out = self.to_package().to_dict()
        if self.transformers_version:
            out["transformers_version"] = self.transformers_version
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    # -- convenience ----------------------------------------------------------------------------------------

    @property
    def torch_dtype(self) -> str:
        """The stored weights' dtype name (``bfloat16``, ``float16``, ``float32``)."""
        return str(self.dtype or "bfloat16").replace("torch.", "")


def _dataclass(dc, value, name: str):
    if value is None:
        return dc()
    if isinstance(value, dc):
        return value
    if isinstance(value, dict):
        bad = sorted(set(value) - set(dc.__dataclass_fields__))
        if bad:
            raise PackageError(f"config: unknown key(s) {bad} in {name!r}")
        return dc(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items()})
    if hasattr(value, "__dataclass_fields__"):  # e.g. osum_jax's EncoderConfig (adds training-only fields)
        fields = set(dc.__dataclass_fields__)
        return dc(**{k: v for k, v in asdict(value).items() if k in fields})
    raise PackageError(f"config: {name!r} must be a mapping, got {type(value).__name__}")
