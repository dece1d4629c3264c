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


def test_ray_device_options_give_each_replica_a_device_or_say_why():
    opts = devices.ray_device_options
    assert opts("npu", {"NPU": 8.0, "CPU": 4.0}, workers=8) == ("npu", {"resources": {"NPU": 1.0}})
    assert opts("cuda", {"GPU": 2.0}, workers=4, per_worker=0.5) == ("cuda", {"num_gpus": 0.5})
    assert opts("auto", {"GPU": 1.0, "NPU": 4.0}, workers=1) == ("cuda", {"num_gpus": 1.0})
    assert opts("auto", {"NPU": 4.0}, workers=4) == ("npu", {"resources": {"NPU": 1.0}})
    assert opts("auto", {"CPU": 2.0}, workers=2) == ("cpu", {})
    assert opts("auto", None, workers=2) == ("auto", {})  # before ray.init: nothing known, nothing asked
    with pytest.raises(ValueError, match="Ray gives each its own device; pass 'npu' without an index"):
        opts("npu:1", None, workers=2)
    with pytest.raises(ValueError, match="every replica would take npu:0"):
        opts("npu", None, workers=2, per_worker=0)
    with pytest.raises(ValueError, match=r"3 replica\(s\) x 1 NPU need 3, but the Ray cluster has 2"):
        opts("npu", {"NPU": 2.0}, workers=3)
    with pytest.raises(ValueError, match="the Ray cluster has no GPU resource"):
        opts("cuda", {"CPU": 8.0}, workers=1)
    assert devices.worker_device("npu", {"NPU": ["3"]}, {"ASCEND_RT_VISIBLE_DEVICES": "3"}) == \
        ("npu:0", "Ray NPU 3 (ASCEND_RT_VISIBLE_DEVICES=3)")
    assert devices.worker_device("cuda", {"GPU": ["2"]}, {})[0] == "cuda:2"  # RAY_EXPERIMENTAL_NOSET_*: the index
    with pytest.raises(RuntimeError, match="holds no NPU"):
        devices.worker_device("npu", {"NPU": []}, {})
    assert devices.worker_device("cpu", {}, {}) == ("cpu", "")


@pytest.mark.slow
def test_ray_serve_replicas_get_distinct_simulated_devices(tmp_path):
    """A local Ray (CPU) told it has 3 NPUs and 3 GPUs: osum-serve's application asks one device per replica,
    and 3 Ray Serve replicas started with those options each see a different device through the variable Ray
    sets (what torch_npu / CUDA read), so each one's npu:0 / cuda:0 is its own. Without the request (the earlier
    behaviour) no variable is set: every replica takes device 0."""
    import json
    import os

    import ray
    from ray import serve

    from osum_torch_infer.serve.ray_serve import application

    ray.init(num_cpus=2, num_gpus=3, resources={"NPU": 3}, include_dashboard=False, object_store_memory=128 << 20,
             logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        seen = {}
        for device, count in (("npu", 3), ("cuda", 3), ("cpu", 2)):
            bound = application(tmp_path / "pkg", replicas=count, cpus_per_replica=0.1, device=device)
            options = bound._bound_deployment.ray_actor_options

            @serve.deployment(num_replicas=count, ray_actor_options=options)
            class Probe:  # what OSUMReplica.__init__ does before loading: its device from Ray
                def __init__(self, device: str, out: str):
                    from osum_torch_infer.devices import VISIBLE_DEVICES_ENV, worker_device

                    dev, why = worker_device(device, ray.get_runtime_context().get_accelerator_ids(),
                                             dict(os.environ))
                    env = {k: os.environ.get(k) for k in VISIBLE_DEVICES_ENV.values()}
                    with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
                        json.dump({"device": dev, "why": why, "env": env}, f)

                def __call__(self):
                    return "ok"

            out = tmp_path / device
            out.mkdir()
            serve.run(Probe.bind(device, str(out)), name=device, route_prefix=None)
            seen[device] = [json.loads(f.read_text()) for f in out.glob("*.json")]
            serve.delete(device)
    finally:
        serve.shutdown()
        ray.shutdown()
    npu, cuda, cpu = seen["npu"], seen["cuda"], seen["cpu"]
    assert len(npu) == 3 and {r["device"] for r in npu} == {"npu:0"}
    assert sorted(r["env"]["ASCEND_RT_VISIBLE_DEVICES"] for r in npu) == ["0", "1", "2"]
    assert len({r["why"] for r in npu}) == 3 and all(r["env"]["CUDA_VISIBLE_DEVICES"] is None for r in npu)
    assert len(cuda) == 3 and {r["device"] for r in cuda} == {"cuda:0"}
    assert sorted(r["env"]["CUDA_VISIBLE_DEVICES"] for r in cuda) == ["0", "1", "2"]
    assert len(cpu) == 2 and all(r["device"] == "cpu" and r["env"]["ASCEND_RT_VISIBLE_DEVICES"] is None
                                 for r in cpu)


def test_osum_serve_refuses_replica_devices_it_cannot_give(tmp_path, capsys):
    """The per-replica device flags are checked before Ray starts: one line, exit 2."""
    from osum_torch_infer.serve import cli as serve_cli

    (tmp_path / "config.json").write_text("{}")
    for flags, message in ((["--device", "npu:1"], "pass 'npu' without an index"),
                           (["--device", "cuda", "--gpus-per-replica", "0"], "every replica would take cuda:0"),
                           (["--device", "npu", "--npus-per-replica", "-1"], "--npus-per-replica -1 is out of range")):
        assert serve_cli.main([str(tmp_path), "--replicas", "2", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("osum-serve: error: ") and message in err[0], (flags, err)
