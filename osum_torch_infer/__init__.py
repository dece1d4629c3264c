"""Standalone PyTorch inference runtime for OSUM packages (torch + transformers only; never imports JAX).

The runtime itself arrives with the inference issue; this package is reserved for it.
"""
