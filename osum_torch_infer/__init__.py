"""Standalone PyTorch inference runtime for OSUM packages (torch + transformers; never imports JAX).

Importing the package is cheap: torch and transformers are imported only when a model class is used, and
:mod:`osum_torch_infer.scoring` / :mod:`osum_torch_infer.parsing` need neither (the JAX trainer shares them)::

    from osum_torch_infer import OSUMForConditionalGeneration
    model = OSUMForConditionalGeneration.from_pretrained("PKG", device="auto", dtype="auto")
"""

from __future__ import annotations

import importlib

__all__ = ["OSUMForConditionalGeneration", "PackageError", "export_onnx", "load_audio", "log_mel_spectrogram"]

_LAZY = {
    "OSUMForConditionalGeneration": "modeling",
    "PackageError": "modeling",
    "export_onnx": "onnx_export",
    "load_audio": "features",
    "log_mel_spectrogram": "features",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
