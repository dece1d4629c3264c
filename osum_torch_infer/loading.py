"""What loading a package needs beyond transformers' ``from_pretrained``: checks that name the file, the peft
adapter merge, the float16 range check, and reading the audio tower alone.

transformers does the loading itself (shard index, meta-device build, dtype, device placement, rotary buffers);
these helpers run before it (is the package complete?) and after it (merge, cast).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .package import PackageError

FP16_MAX = 65504.0


def weight_files(root: Path) -> list[Path]:
    """The package's safetensors files (from the index when sharded); a missing one is named."""
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise PackageError(f"cannot read {index}: {e}") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
    elif single.is_file():
        files = [single]
    else:
        raise PackageError(f"{root}: neither model.safetensors nor model.safetensors.index.json found")
    for f in files:
        if not f.is_file():
            raise PackageError(f"{root}: weight file {f.name} (listed in the index) is missing")
    return files


def check_tensors(root: Path, expected: dict[str, tuple[int, ...]], prefixes: tuple[str, ...] = ("",)) -> None:
    """The package's tensor names and shapes (safetensors headers only; those under ``prefixes``) against the
    model's: every difference listed, with the file of each mismatching tensor. A missing shard is named."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in weight_files(root):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                if not key.startswith(prefixes):
                    continue
                if key in found:
                    raise PackageError(f"{f.name}: tensor {key!r} also stored in {found[key][1]}")
                found[key] = (tuple(sf.get_slice(key).get_shape()), f.name)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = [f"{k}: file {found[k][0]} != model {s} ({found[k][1]})" for k, s in expected.items()
           if k in found and found[k][0] != s]
    if missing or unexpected or bad:
        raise PackageError(f"{root} does not match its config.json: missing {missing[:10]} ({len(missing)}), "
                           f"unexpected {unexpected[:10]} ({len(unexpected)}), shape mismatches {bad[:10]}")


def read_adapter(root: Path) -> tuple[float, dict[str, dict[str, torch.Tensor]]]:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (peft names) -> ``(alpha / r, {module: {A, B}})``
    with module names relative to the LLM (``model.layers.0.self_attn.q_proj``). Plain LoRA only."""
    from safetensors.torch import load_file

    acfg_file = root / "adapter_config.json"
    try:
        acfg = json.loads(acfg_file.read_text(encoding="utf-8"))
        r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PackageError(f"cannot read r/lora_alpha from {acfg_file}: {e}") from None
    unsupported = {k: acfg[k] for k in ("use_rslora", "use_dora", "fan_in_fan_out") if acfg.get(k)}
    unsupported.update({k: acfg[k] for k in ("rank_pattern", "alpha_pattern") if acfg.get(k)})
    if unsupported:
        raise PackageError(f"{acfg_file}: adapter options {unsupported} are not supported (plain LoRA only: "
                           f"W += lora_alpha / r * B @ A); merge the adapter with peft before packaging")
    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        raise PackageError(f"{root}: {acfg_file.name} is present but {weights.name} is missing")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(weights)).items():
        if not key.startswith("base_model.model.") or not (".lora_A." in key or ".lora_B." in key):
            raise PackageError(f"{weights.name}: unexpected tensor {key!r}")
        which = "A" if ".lora_A." in key else "B"
        module = key[len("base_model.model."):].split(f".lora_{which}.")[0]
        pairs.setdefault(module, {})[which] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise PackageError(f"{weights.name}: {module} has only lora_{''.join(ab)}")
    return alpha / r, pairs


@torch.no_grad()
def merge_adapter(llm: torch.nn.Module, root: Path) -> int:
    """``W += alpha / r * B @ A`` for every adapter pair of the package (in float32, then cast back)."""
    scaling, pairs = read_adapter(root)
    modules = dict(llm.named_modules())
    for module, ab in pairs.items():
        lin = modules.get(module)
        if lin is None or not hasattr(lin, "weight"):
            raise PackageError(f"adapter_model.safetensors: {module} has no base weight 'llm.{module}.weight'")
        w = lin.weight
        delta = ab["B"].to(w.device, torch.float32) @ ab["A"].to(w.device, torch.float32)
        w.copy_((w.float() + scaling * delta).to(w.dtype))
    return len(pairs)


@torch.no_grad()
def cast_parameters(model: torch.nn.Module, dtype: torch.dtype, where: Path) -> None:
    """Cast every floating parameter to ``dtype`` one tensor at a time; a cast to float16 that would turn finite
    values into inf is refused, naming the tensors (the Ascend 310P path has no bf16)."""
    overflow = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.dtype == dtype:
            continue
        if dtype == torch.float16 and bool(torch.isfinite(p).all()):
            peak = float(p.abs().max())
            if peak > FP16_MAX:
                overflow.append(f"{name} (max |x| {peak:.4g})")
                continue
        p.data = p.data.to(dtype)
    if overflow:
        raise PackageError(f"{where}: values beyond the float16 range (65504) in {len(overflow)} tensor(s): "
                           f"{overflow[:10]}; load in bf16/fp32, or export with --dtype fp16 to see the check "
                           f"at export time")


def load_audio_tensors(model: torch.nn.Module, root: Path, prefixes: tuple[str, ...], device: torch.device,
                       dtype: torch.dtype) -> None:
    """Fill only the tensors under ``prefixes`` of a model built on the meta device (the audio tower for ONNX
    export: ~0.3 B instead of 8 B parameters read); everything else stays on the meta device."""
    from safetensors import safe_open

    check_tensors(root, {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)},
                  prefixes)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(root):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                if key.startswith(prefixes):
                    state[key] = sf.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)


# -- the runtime's loading policy: device, dtype, NPU fusions, float16 calibration ---------------------------------

AUDIO_PREFIXES = ("encoder.", "adapter.", "speech_embed.")  # the audio tower's tensors (+ the speech markers)
_SPREAD_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map strategies
POLICY_DTYPES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16")  # load_model's names (and "auto")


def load_model(path: str | Path, *model_args, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = "auto", npu_fusions: bool = True, parts: str = "all",
               model_class=None, **kwargs):
    """Load a package the way the runtime's commands do (``osum-infer``, ``osum-serve``, the Ray actors).

    ``device``: ``auto`` (cuda, then npu, then cpu; the choice and its reason are logged and kept as
    ``model.device_reason``), ``cuda[:N]``, ``npu[:N]``, ``cpu``; ``device_map=`` (transformers') is passed through
    instead when given. ``dtype``: ``auto`` (float32 on CPU, the package dtype on accelerators, float16 where bf16
    is missing), ``fp32``, ``fp16``, ``bf16``. On an NPU the LLM's fused kernels are switched on
    (``npu_fusions``). A float16 model without a passing ``calibrate-fp16`` report beside the package is warned
    about. ``parts="audio"`` reads only the audio tower's tensors (encoder, adapter): the LLM stays on the meta
    device and is unusable (what ONNX export of the tower needs, ~0.3 B instead of 8 B parameters).

    The model itself is loaded by ``OSUMForConditionalGeneration.load_package`` (transformers'
    ``from_pretrained`` with the package checks)."""
    import logging

    from .devices import apply_npu_fusions, resolve_dtype, select_device
    from .package import PackageConfig

    if model_class is None:
        from .modeling import OSUMForConditionalGeneration as model_class
    log = logging.getLogger("osum_torch_infer")
    if parts not in ("all", "audio"):
        raise ValueError(f"parts={parts!r}: expected 'all' or 'audio'")
    root = Path(path)
    if not root.is_dir():
        raise PackageError(f"{root} is not a package directory")
    pkg = PackageConfig.from_json(root / "config.json")
    device_map = kwargs.pop("device_map", None)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in _SPREAD_MAPS:
        dev, why = torch.device(device_map), "device_map"
    else:  # ours, or transformers spreading the model ("auto", a dict, ...) over the devices we pick
        dev, why = select_device(device)
        why = why if device_map is None else f"{why}; device_map={device_map!r}"
    dt = resolve_dtype(dtype, dev, pkg.torch_dtype)
    log.info("osum_torch_infer: %s on %s, %s (%s; dtype %s)", root, dev, str(dt).replace("torch.", ""), why,
             dtype if dtype not in (None, "auto") else f"auto: package {pkg.torch_dtype}")
    if parts == "audio":
        from .configuration_osum import OSUMConfig

        with torch.device("meta"):
            model = model_class(OSUMConfig.from_package(pkg))
        load_audio_tensors(model, root, AUDIO_PREFIXES, dev, dt)
        model.eval().requires_grad_(False)
        model.path = root
        model._load_text_side(root)
    else:
        model = model_class.load_package(root, *model_args, dtype=dt, device_map=device_map or dev, **kwargs)
        if dev.type == "npu" and npu_fusions:
            apply_npu_fusions(model.llm)
    model.device_reason = why
    warning = (pkg.metadata.get("prompts") or {}).get("warning")
    if warning:
        log.warning("osum_torch_infer: %s: %s", root, warning)
    if dt == torch.float16:
        from .calibrate import REPORT, passing_report

        if not passing_report(root):
            log.warning("osum_torch_infer: %s runs in float16 without a passing %s next to it: Qwen2 activations and "
                        "attention scores can exceed 65504 (the 310P saturates silently); run "
                        "`osum-infer calibrate-fp16 --model %s --data LIST` on CPU first", root, REPORT, root)
    return model
