"""Loading configs: YAML files and dotted ``key=value`` overrides, every key and type checked.

``load_config("configs/tiny.yaml", ["model.llm.num_layers=4"])``; an unknown key or a value of the wrong type
raises :class:`~osum_jax.config.ConfigError` naming the key and the file (or override) it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .config import Config, ConfigError, to_plain


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int/float/bool/str/tuple[...]/dataclass/Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:  # try the next member
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[A, B]
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
            items = [_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args))]
            return tuple(items)
        item_t = args[0] if args else Any
        items = [_coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # keys older osum-jax versions wrote into run configs, read and dropped so those runs stay readable
    data = {k: v for k, v in data.items() if k not in getattr(cls, "RETIRED_KEYS", ())}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, cls: type, where: str) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, checking each key against the dataclasses."""
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in fields:
            prefix = ".".join(parts[:i]) or "<top>"
            raise ConfigError(f"{where}: unknown key {part!r} under {prefix}; valid keys: {sorted(fields)}")
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_t = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(sub_t):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} must be a mapping")
        node_cls = sub_t


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1,2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]`` (values parsed as YAML scalars/lists)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        out.append((key, value))
    return out


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Config:
    tree = to_plain(dict(data or {}))
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    # Validate the file's own keys first so errors name the file, then apply overrides.
    _build(Config, tree, source)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value, Config, f"override {key}={value!r}")
    cfg = _build(Config, tree, "")
    return cfg.validate()


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML) onto the defaults and apply ``key=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return config_from_dict(data, overrides, source=str(path))
