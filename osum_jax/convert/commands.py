"""The conversions behind ``osum-convert`` as Python functions, one module per command: :mod:`.import_osum`,
:mod:`.import_hf`, :mod:`.export_osum`, :mod:`.export_torch`, :mod:`.average`, :mod:`.inspect` (streaming helpers in
:mod:`.stream`).

Every import first checks the complete key/shape plan against the config (reading only headers), then streams
the tensors one block at a time into the orbax checkpoint (see :mod:`osum_jax.checkpoint`).
"""

from .average import average
from .export_osum import export_osum, osum_export_source
from .import_hf import hf_model_fields, import_hf
from .import_osum import import_osum
from .inspect import inspect

__all__ = ["average", "export_osum", "hf_model_fields", "import_hf", "import_osum", "inspect", "osum_export_source"]
