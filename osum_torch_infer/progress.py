"""The one progress bar (tqdm, on stderr; a no-op when ``enabled`` is False), used by every command: indexing tars,
``make-shards``, training, conversion, ``osum-infer``. Torch- and JAX-free."""

from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, **kwargs: Any):
    """A ``tqdm`` bar (``update``, ``set_postfix``, ``close``; iterate it when ``iterable`` is given)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, **kwargs)
