"""Device and dtype selection. ``torch_npu`` is imported only here, only when an NPU is requested or probed.

Installing torch-npu on a machine without Ascend CANN makes ``import torch`` itself fail, so it is an optional
extra for Ascend hosts; on GPU/CPU machines it is simply absent and ``device="auto"`` never touches it.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_npu_state: dict[str, object] = {}
log = logging.getLogger("osum_torch_infer")


def import_torch_npu():
    """Import ``torch_npu`` (registers the ``npu`` device); a clear error if it is missing or broken.

    Right after the import, online (JIT) operator compilation is turned off
    (``torch.npu.set_compile_mode(jit_compile=False)``): the 310P and 910A default to compiling every new shape,
    and decoding grows the KV cache by one position each step."""
    if "module" in _npu_state:
        return _npu_state["module"]
    try:
        import torch_npu  # noqa: F401  (Ascend only; registers torch.npu)
    except Exception as e:  # ImportError, or CANN libraries missing at load time
        raise RuntimeError(f"device 'npu' needs torch_npu with Ascend CANN (pip install 'osum-jax[npu]' on an "
                           f"Ascend host): {type(e).__name__}: {e}") from None
    set_mode = getattr(getattr(torch, "npu", None), "set_compile_mode", None)
    if set_mode is not None:
        set_mode(jit_compile=False)
    _npu_state["module"] = torch_npu
    return torch_npu


def _cuda_unusable() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if torch.cuda.is_available():
        return None
    if not torch.version.cuda:
        return "this torch build has no CUDA (a CPU build)"
    try:  # a CUDA build without a usable GPU: the driver says why
        torch.cuda.init()
    except Exception as e:
        return f"CUDA build {torch.version.cuda}, but CUDA cannot start: {type(e).__name__}: {e}"
    return f"CUDA build {torch.version.cuda}, but no GPU is visible (CUDA_VISIBLE_DEVICES, driver)"


def _npu_unusable() -> str | None:
    """Why an Ascend NPU cannot be used here, or None when it can."""
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed"
    try:
        import_torch_npu()
    except RuntimeError as e:
        return str(e)
    try:
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            return "torch_npu sees no NPU (check npu-smi info)"
    except Exception as e:
        return f"torch.npu.is_available() failed: {type(e).__name__}: {e}"
    return None


def npu_available() -> bool:
    """True when torch_npu is installed and sees at least one NPU. Never raises."""
    return _npu_unusable() is None


def select_device(device: str | torch.device = "auto") -> tuple[torch.device, str]:
    """``(device, why)``: ``auto`` -> cuda, then npu, then cpu, with the reason each accelerator was not used;
    ``cuda[:N]`` / ``npu[:N]`` fail with that reason instead of falling back. ``npu`` resolves to ``npu:N`` (the
    current device) and is made the current device before any tensor moves."""
    name = str(device).strip().lower()
    if name == "auto":
        cuda_why = _cuda_unusable()
        if cuda_why is None:
            return torch.device("cuda", torch.cuda.current_device()), "auto: CUDA is available"
        npu_why = _npu_unusable()
        if npu_why is None:
            return _npu_device("npu"), f"auto: no CUDA ({cuda_why}); an Ascend NPU is available"
        why = f"auto: no CUDA ({cuda_why}); no NPU ({npu_why})"
        expected = torch.version.cuda or importlib.util.find_spec("torch_npu") is not None
        if expected:  # an accelerator stack is installed but not usable: say so loudly
            log.warning("osum_torch_infer: running on CPU, although an accelerator stack is installed: %s", why)
        return torch.device("cpu"), why
    if name.startswith("npu"):
        why = _npu_unusable()
        if why is not None:
            raise RuntimeError(f"device {name!r} requested but {why}")
        return _npu_device(name), "requested"
    if name.startswith("cuda"):
        why = _cuda_unusable()
        if why is not None:
            raise RuntimeError(f"device {name!r} requested but {why}")
        dev = torch.device(name)
        return (dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())), "requested"
    if name == "cpu":
        return torch.device("cpu"), "requested"
    raise ValueError(f"unknown device {device!r}; expected auto, cuda[:N], npu[:N] or cpu")


def _npu_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.index is None:
        dev = torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    torch.npu.set_device(dev)  # type: ignore[attr-defined]  (before the first tensor moves)
    return dev


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """:func:`select_device` without the reason."""
    return select_device(device)[0]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, package_dtype: str) -> torch.dtype:
    """``None``/``auto``: float32 on CPU; the package's dtype on accelerators (bf16 -> fp16 where bf16 is missing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        dt = DTYPES.get(package_dtype, torch.bfloat16)
        if dt == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        if dt == torch.bfloat16 and device.type == "npu":  # Ascend 310P has no bf16
            probe = getattr(getattr(torch, "npu", None), "is_bf16_supported", None)  # registered by torch_npu
            if probe is not None and not probe():
                return torch.float16
        return dt
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of fp32, fp16, bf16 (or auto)") from None


def apply_npu_fusions(llm: torch.nn.Module) -> int:
    """On NPU, run Qwen2's RMSNorm with ``torch_npu.npu_rms_norm`` (transformers uses the unfused op).

    Attention needs nothing here: transformers' SDPA path dispatches to torch_npu's fused attention kernel.
    Returns the number of patched modules.
    """
    torch_npu = import_torch_npu()
    n = 0
    for module in llm.modules():
        if type(module).__name__ == "Qwen2RMSNorm":
            eps = module.variance_epsilon

            def forward(hidden_states, _m=module, _eps=eps):
                return torch_npu.npu_rms_norm(hidden_states, _m.weight, epsilon=_eps)[0]

            module.forward = forward
            n += 1
    return n


# -- one device per Ray worker (osum-serve --replicas, Ray actors) ---------------------------------------------------

RAY_RESOURCE = {"cuda": "GPU", "npu": "NPU"}  # Ray's accelerator resources (it sets the variables below for them)
VISIBLE_DEVICES_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}


def ray_device_options(device: str, cluster: dict | None, *, workers: int,
                       per_worker: float | None = None) -> tuple[str, dict]:
    """``(the device type each Ray worker loads on, its resource options)`` for ``workers`` workers on ``device``.

    A worker on ``cuda`` asks Ray for ``per_worker`` GPUs (default 1), on ``npu`` for ``per_worker`` of the
    ``NPU`` resource (Ray's name for Ascend NPUs): Ray then sets the worker's ``CUDA_VISIBLE_DEVICES`` /
    ``ASCEND_RT_VISIBLE_DEVICES`` to the device(s) it holds, so its ``cuda:0`` / ``npu:0`` is its own (a fraction
    such as 0.5 puts two workers on one device, on purpose). Without it every worker sees every device and takes
    device 0. ``auto`` picks cuda when ``cluster`` (``ray.cluster_resources()``) has GPUs, else npu when it has
    NPUs, else cpu; without a cluster it stays ``auto`` with no accelerator asked for. ``ValueError`` naming the
    problem: an index (``npu:1``: Ray assigns the devices), no or too few devices for the workers."""
    name = str(device).strip().lower()
    if ":" in name and name.split(":")[0] in RAY_RESOURCE:
        raise ValueError(f"--device {device!r}: with several replicas Ray gives each its own device; pass "
                         f"{name.split(':')[0]!r} without an index")
    if name not in ("auto", "cpu", *RAY_RESOURCE):
        raise ValueError(f"unknown device {device!r}; expected auto, cuda, npu or cpu")
    if per_worker is not None and per_worker < 0:
        raise ValueError(f"devices per replica must be >= 0, got {per_worker:g}")
    if name == "auto":
        if cluster is None:
            return "auto", {}
        name = "cuda" if cluster.get("GPU") else "npu" if cluster.get("NPU") else "cpu"
    if name == "cpu":
        return "cpu", {}
    res = RAY_RESOURCE[name]
    per = 1.0 if per_worker is None else float(per_worker)
    if per == 0:
        raise ValueError(f"--device {name} with 0 {res}s per replica: every replica would take {name}:0; give each "
                         f"one (the default) or a fraction to share a device")
    if cluster is not None:
        have = float(cluster.get(res, 0))
        if have <= 0:
            raise ValueError(f"--device {name}: the Ray cluster has no {res} resource (start Ray on hosts whose "
                             f"{name} devices it detects, or declare them: ray start --resources='{{\"{res}\": N}}')")
        if per * workers > have + 1e-9:
            raise ValueError(f"{workers} replica(s) x {per:g} {res} need {per * workers:g}, but the Ray cluster has "
                             f"{have:g}")
    return name, ({"num_gpus": per} if res == "GPU" else {"resources": {res: per}})


def worker_device(device: str, accelerator_ids: dict, environ: dict) -> tuple[str, str]:
    """Inside a Ray worker started with :func:`ray_device_options`: ``(the torch device to load on, why)``, from
    Ray's ``get_runtime_context().get_accelerator_ids()`` and the worker's environment. ``cuda`` / ``npu`` become
    index 0 of the devices Ray made visible (the worker's own); where Ray was told not to set the variable
    (``RAY_EXPERIMENTAL_NOSET_*``), the index Ray assigned. ``RuntimeError`` when the worker holds no such device
    (it would silently share device 0)."""
    name = str(device).strip().lower()
    if name not in RAY_RESOURCE:
        return name, ""
    res, env = RAY_RESOURCE[name], VISIBLE_DEVICES_ENV[name]
    ids = [str(i) for i in accelerator_ids.get(res) or []]
    if not ids:
        raise RuntimeError(f"this Ray worker holds no {res} (start it with ray_device_options' resources): on "
                           f"{name} it would share {name}:0 with every other worker")
    visible = environ.get(env)
    if visible is None or not visible.strip():
        return f"{name}:{ids[0]}", f"Ray {res} {','.join(ids)} ({env} not set)"
    return f"{name}:0", f"Ray {res} {','.join(ids)} ({env}={visible})"
