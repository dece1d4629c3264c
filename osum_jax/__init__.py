"""osum-jax: OSUM in JAX/Flax (training, conversion, the data pipeline)."""

from .platforms import configure as _configure_platforms

_configure_platforms()  # before any module of the package imports JAX: see osum_jax/platforms.py
