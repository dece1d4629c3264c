"""Device and dtype selection. ``torch_npu`` is imported only here, only when an NPU is requested or probed.

Installing torch-npu on a machine without Ascend CANN makes ``import torch`` itself fail, so it is an optional
extra for Ascend hosts; on GPU/CPU machines it is simply absent and ``device="auto"`` never touches it.
"""

from __future__ import annotations

import importlib.util

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_npu_state: dict[str, object] = {}


def import_torch_npu():
    """Import ``torch_npu`` (registers the ``npu`` device); a clear error if it is missing or broken."""
    if "module" in _npu_state:
        return _npu_state["module"]
    try:
        import torch_npu  # noqa: F401  (Ascend only; registers torch.npu)
    except Exception as e:  # ImportError, or CANN libraries missing at load time
        raise RuntimeError(f"device 'npu' needs torch_npu with Ascend CANN (pip install 'osum-jax[npu]' on an "
                           f"Ascend host): {type(e).__name__}: {e}") from None
    _npu_state["module"] = torch_npu
    return torch_npu


def npu_available() -> bool:
    """True when torch_npu is installed and sees at least one NPU. Never raises."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import_torch_npu()
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception:
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda, then npu, then cpu; ``npu``/``npu:1`` imports torch_npu; ``cuda`` checks availability."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if npu_available():
            return torch.device("npu")
        return torch.device("cpu")
    if name.startswith("npu"):
        import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise RuntimeError("device 'npu' requested but torch_npu sees no NPU (check npu-smi info)")
        return torch.device(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available in this torch build/host")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; expected auto, cuda[:N], npu[:N] or cpu")


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
