"""Checkpoint conversion: Hugging Face / official OSUM torch checkpoints <-> JAX parameters.

This package is the one place that knows both worlds' parameter names (one name table per source format).
"""
