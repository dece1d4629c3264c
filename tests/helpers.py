"""Shared test utilities: tiny configs, torch <-> numpy, error metrics."""

from __future__ import annotations

import dataclasses

import numpy as np

from osum_jax.config_loading import load_config

TINY = "configs/tiny.yaml"


def tiny_model_config(**overrides):
    """The tiny config with ``key=value`` overrides relative to ``model.``."""
    ov = [f"model.{k}={v}" for k, v in overrides.items()]
    return load_config(TINY, ov).model


def to_np(t) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def state_to_np(module) -> dict[str, np.ndarray]:
    return {k: to_np(v) for k, v in module.state_dict().items()}


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def write_tar(path, members) -> None:
    """A tar shard from ``(member name, bytes)`` pairs (OSUM's shard_full_data layout when named KEY.suffix)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def assert_same_loss_and_grads(got, want, *, loss_rtol: float, grad_rel: float) -> None:
    """``(loss, grads)`` pairs from ``jax.value_and_grad`` agree: the loss to ``loss_rtol``, every gradient leaf to
    ``grad_rel`` of its largest magnitude."""
    import jax

    (l1, g1), (l0, g0) = got, want
    np.testing.assert_allclose(float(l1), float(l0), rtol=loss_rtol)
    flat1, flat0 = jax.tree.leaves(g1), jax.tree.leaves(g0)
    assert len(flat1) == len(flat0) > 20
    for a, b in zip(flat1, flat0):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= grad_rel * np.abs(b).max() + 1e-9


def headless_chromium(chromium):
    """A selenium driver for Debian's headless chromium (``chromium``: the conftest fixture's (binary, driver));
    a browser that cannot start fails the test, with the reason."""
    import pytest
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1400"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as e:  # noqa: BLE001 - a browser that cannot start is a failure here, with the reason
        pytest.fail(f"headless chromium did not start: {e}")
