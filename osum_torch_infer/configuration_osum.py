"""``OSUMConfig``: the transformers config class of an OSUM package (``model_type`` ``"osum"``).

As Qwen2-Audio's config: the audio side (``encoder``, ``adapter``: Whisper-medium encoder and OSUM's link) beside a
``Qwen2Config`` ``text_config``. Reading and writing go through the package schema
(:class:`osum_torch_infer.package.PackageConfig`), so ``config.json`` has one definition; importing
:mod:`osum_torch_infer.modeling` registers the class with ``AutoConfig`` (never ``trust_remote_code``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig, Qwen2Config

from .package import MODEL_TYPE, AdapterConfig, EncoderConfig, PackageConfig, PackageError


def _config_class(name: str, schema, model_type: str) -> type[PreTrainedConfig]:
    """A ``PreTrainedConfig`` whose fields (names, types, defaults) are those of the package schema's dataclass
    ``schema``: the fields are declared once, in :mod:`osum_torch_infer.package` (torch- and transformers-free,
    which the JAX side reads); lists read from JSON become tuples again."""
    fields = dataclasses.fields(schema)

    def __post_init__(self, **kwargs):
        for f in fields:
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        PreTrainedConfig.__post_init__(self, **kwargs)

    def to_schema(self):
        """The package schema's dataclass (what ``config.json`` stores)."""
        return schema(**{f.name: getattr(self, f.name) for f in fields})

    namespace = {"__module__": __name__, "__qualname__": name, "model_type": model_type,
                 "__doc__": f"{schema.__doc__}\n\nA ``PreTrainedConfig`` with the fields of "
                            f":class:`osum_torch_infer.package.{schema.__name__}`.",
                 "__annotations__": {f.name: f.type for f in fields}, "__post_init__": __post_init__,
                 "to_schema": to_schema, **{f.name: f.default for f in fields}}
    return type(name, (PreTrainedConfig,), namespace)


OSUMEncoderConfig = _config_class("OSUMEncoderConfig", EncoderConfig, "osum_encoder")
OSUMAdapterConfig = _config_class("OSUMAdapterConfig", AdapterConfig, "osum_adapter")
_SUB_SCHEMAS = {"encoder": EncoderConfig, "adapter": AdapterConfig}
# the top-level keys OSUMConfig keeps as they are (PackageConfig's other fields: the sub-configs and the dtype)
_PLAIN_FIELDS = tuple(f.name for f in dataclasses.fields(PackageConfig)
                      if f.name not in ("encoder", "adapter", "text_config", "torch_dtype"))


class OSUMConfig(PreTrainedConfig):
    """``encoder`` / ``adapter``: :class:`OSUMEncoderConfig` / :class:`OSUMAdapterConfig` (dicts, or the package
    schema's dataclasses, accepted); ``text_config``: a ``Qwen2Config`` (or its dict; ``llm=`` is accepted as an
    alias). The other fields and their defaults are :class:`~osum_torch_infer.package.PackageConfig`'s."""

    model_type = MODEL_TYPE
    # built in __post_init__ (as Qwen2AudioConfig does), which transformers 5.17 and 5.23 both run
    sub_configs = {"text_config": Qwen2Config, "encoder": OSUMEncoderConfig, "adapter": OSUMAdapterConfig}

    encoder: dict | PreTrainedConfig | None = None
    adapter: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    __annotations__.update({f.name: Any for f in dataclasses.fields(PackageConfig) if f.name in _PLAIN_FIELDS})
    locals().update({f.name: None for f in dataclasses.fields(PackageConfig) if f.name in _PLAIN_FIELDS})

    def __post_init__(self, **kwargs):
        if "llm" in kwargs and self.text_config is None:
            self.text_config = kwargs.pop("llm")
        for key in ("format", "format_version"):  # the schema's, checked by PackageConfig.from_dict
            kwargs.pop(key, None)
        if isinstance(self.text_config, dict):
            self.text_config = {k: v for k, v in self.text_config.items()
                                if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
        for name, schema in _SUB_SCHEMAS.items():
            setattr(self, name, _sub_dict(schema, getattr(self, name), name))
        for name, cls in self.sub_configs.items():
            value = getattr(self, name)
            if not isinstance(value, PreTrainedConfig):
                setattr(self, name, cls(**(value or {})))
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(PackageConfig) if f.name in _PLAIN_FIELDS}
        for name, default in defaults.items():
            value = getattr(self, name)
            value = default if value is None else value
            setattr(self, name, dict(value) if isinstance(default, dict) else value)
        super().__post_init__(**kwargs)

    # -- the package schema ---------------------------------------------------------------------------------

    @classmethod
    def from_package(cls, pkg: PackageConfig) -> "OSUMConfig":
        return cls(encoder=pkg.encoder, adapter=pkg.adapter, text_config=dict(pkg.text_config),
                   torch_dtype=pkg.torch_dtype, **{k: getattr(pkg, k) for k in _PLAIN_FIELDS})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """What ``AutoConfig.from_pretrained`` calls: validated by the package schema first."""
        pkg = PackageConfig.from_dict(config_dict)
        return super().from_dict(pkg.to_dict(), **kwargs)

    def to_package(self) -> PackageConfig:
        text = {k: v for k, v in self.text_config.to_dict().items()
                if not k.startswith("_") and k not in ("transformers_version", "id2label", "label2id")}
        return PackageConfig(encoder=self.encoder.to_schema(), adapter=self.adapter.to_schema(), text_config=text,
                             torch_dtype=self.torch_dtype, **{k: getattr(self, k) for k in _PLAIN_FIELDS})

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


def _sub_dict(schema, value, name: str):
    """A sub-config as the dict its ``PreTrainedConfig`` is built from (a config object is kept): the package
    schema's fields only (osum_jax's subclasses add training-only fields), unknown keys of a dict refused."""
    if value is None or isinstance(value, PreTrainedConfig):
        return value
    names = {f.name for f in dataclasses.fields(schema)}
    if isinstance(value, dict):
        bad = sorted(set(value) - names - {"model_type", "transformers_version"})
        if bad:
            raise PackageError(f"config: unknown key(s) {bad} in {name!r}")
        return {k: v for k, v in value.items() if k in names}
    if dataclasses.is_dataclass(value):  # the schema's dataclass, or osum_jax's subclass of it
        return {k: v for k, v in dataclasses.asdict(value).items() if k in names}
    raise PackageError(f"config: {name!r} must be a mapping, got {type(value).__name__}")
