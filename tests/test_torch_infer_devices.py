"""Device selection says what it did and never falls back silently; Ascend set-up (simulated: no NPU here)."""

import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest
import torch

from osum_torch_infer import devices


@pytest.fixture(autouse=True)
def fresh_npu_state(monkeypatch):
    monkeypatch.setattr(devices, "_npu_state", {})


def _fake_find_spec(real):
    def find_spec(name, *a, **k):
        if name == "torch_npu":
            return importlib.machinery.ModuleSpec("torch_npu", None)
        return real(name, *a, **k)
    return find_spec


def test_auto_on_this_host_names_why_no_accelerator(caplog):
    dev, why = devices.select_device("auto")
    assert dev.type == "cpu" and "no CUDA (" in why and "no NPU (torch_npu is not installed)" in why
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing is installed: no surprise


def test_broken_torch_npu_warns_on_auto_and_fails_on_request(monkeypatch, caplog):
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(importlib.util.find_spec))
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails, as with CANN libraries missing
    with caplog.at_level(logging.WARNING, logger="osum_torch_infer"):
        dev, why = devices.select_device("auto")
    assert dev.type == "cpu" and "torch_npu" in why
    assert any("running on CPU" in r.getMessage() and "torch_npu" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match=r"device 'npu' requested but device 'npu' needs torch_npu"):
        devices.select_device("npu")


def test_cuda_build_that_cannot_start_warns_and_fails_with_the_driver_error(monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040)")

    monkeypatch.setattr(torch.cuda, "init", init)
    with caplog.at_level(logging.WARNING, logger="osum_torch_infer"):
        dev, why = devices.select_device("auto")
    assert dev.type == "cpu" and "driver on your system is too old" in why
    assert any("running on CPU" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="cuda:1' requested but CUDA build 12.4, but CUDA cannot start"):
        devices.select_device("cuda:1")


def test_torch_npu_import_turns_online_compilation_off(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(set_compile_mode=lambda **kw: calls.append(kw)),
                        raising=False)
    devices.import_torch_npu()
    assert calls == [{"jit_compile": False}]


def test_stop_check_has_no_isin():
    """torch.isin falls back to the CPU on NPU (a sync per token); the decode loop uses an equality reduction."""
    import inspect

    from osum_torch_infer.decoding import greedy_decode

    assert "isin(" not in inspect.getsource(greedy_decode)
