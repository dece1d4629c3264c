"""Standalone PyTorch inference runtime for OSUM packages (torch + transformers; never imports JAX).

Importing the package is cheap: torch and transformers are imported only when a model class is used, and
:mod:`osum_torch_infer.scoring` / :mod:`osum_torch_infer.parsing` need neither (the JAX trainer shares them)::

    from osum_torch_infer import load_model
    model = load_model("PKG", device="auto", dtype="auto")  # the runtime's device/dtype policy (loading.py)

or through transformers' auto classes (registered, never ``trust_remote_code``)::

    import osum_torch_infer
    from transformers import AutoModel, AutoProcessor
    processor, model = AutoProcessor.from_pretrained("PKG"), AutoModel.from_pretrained("PKG")
    out = model.generate(**processor(wave, task="<TRANSCRIBE>"))
    text = processor.batch_decode(out)

The registration happens when :mod:`osum_torch_infer.modeling` is imported; importing this package arranges that
for when transformers' auto-class modules load (an import hook), so it stays free of torch until then.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__all__ = ["OSUMForConditionalGeneration", "OSUMProcessor", "PackageError", "load_model", "export_onnx", "load_audio", "log_mel_spectrogram"]

_LAZY = {
    "OSUMForConditionalGeneration": "modeling",
    "PackageError": "modeling",
    "OSUMProcessor": "processing_osum",
    "load_model": "loading",
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


# -- registration with transformers' auto classes ---------------------------------------------------------------------

_AUTO_MODULES = ("transformers.models.auto.modeling_auto", "transformers.models.auto.processing_auto")


def _register() -> None:
    """Import the model module (it registers the config, model, feature extractor and processor classes)."""
    try:
        importlib.import_module(".modeling", __name__)
    except ImportError:  # transformers is partly initialised (an auto module imported from inside it): later
        return
    _AutoHook.done = True


class _AutoHook(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after one of transformers' auto-class modules has been executed."""

    done = False

    def find_spec(self, fullname, path, target=None):
        if self.done or fullname not in _AUTO_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            sys.modules[fullname] = module
            _register()

        loader.exec_module = exec_then_register
        return spec


if any(m in sys.modules for m in _AUTO_MODULES):  # transformers' auto classes are already in use
    _register()
elif not any(isinstance(f, _AutoHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _AutoHook())
