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
def cast_parameters(model: torch.nn.Module, dtype: torch.dtype, where: Path, keep_fp32: tuple[str, ...] = ()) -> None:
    """Cast every floating parameter to ``dtype`` one tensor at a time; a cast to float16 that would turn finite
    values into inf is refused, naming the tensors (the Ascend 310P path has no bf16). Parameters of the modules
    named in ``keep_fp32`` (and below them) become float32 instead, from the stored values."""
    overflow = []
    for name, p in model.named_parameters():
        target = torch.float32 if any(name.startswith(k + ".") for k in keep_fp32) else dtype
        if not p.is_floating_point() or p.dtype == target:
            continue
        if target != dtype:
            p.data = p.data.to(target)
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


# -- mixed precision: some LLM layers in float32 (what a calibrate-fp16 report advises) ----------------------------

LAYERS = "llm.model.layers"
FINAL_NORM = "llm.model.norm"


def keep_fp32_modules(spec, root: str | Path, n_layers: int) -> tuple[tuple[str, ...], str]:
    """``(module names, where they came from)`` for ``keep_fp32=``: ``None``/``""``/``"none"``: nothing;
    ``"auto"``: the layers the package's calibration report (``PKG/fp16_calibration.json``) does not call safe;
    a path ending in ``.json``: those of that report; else layer numbers and LLM module names, comma-separated
    (or a list). A layer is ``llm.model.layers.N``; when the last one is kept, the final norm
    (``llm.model.norm``) is too, as its input is that layer's float32 output. ``PackageError`` naming the report
    or the name on a problem; sub-module names are checked against the model by :func:`apply_keep_fp32`."""
    from .calibrate import REPORT, advised_fp32_layers, read_report

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return (), "none"
    if isinstance(spec, str) and (spec.strip() == "auto" or spec.strip().endswith(".json")):
        report_path = Path(root) / REPORT if spec.strip() == "auto" else Path(spec.strip())
        if spec.strip() == "auto" and not report_path.is_file():
            raise PackageError(f"keep_fp32='auto': no calibration report {report_path}; run `osum-infer "
                               f"calibrate-fp16 --model {root} --data LIST` first, or give the report's path")
        try:
            layers = advised_fp32_layers(read_report(report_path, n_layers))
        except ValueError as e:
            raise PackageError(str(e)) from None
        names, source = [f"{LAYERS}.{i}" for i in layers], f"the advice of {report_path}"
    else:
        parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else [str(x) for x in spec])]
        names, source = [], "given"
        for part in parts:
            if part.isdigit():
                part = f"{LAYERS}.{part}"
            head = part[len(LAYERS) + 1:].split(".")[0] if part.startswith(LAYERS + ".") else ""
            if part != FINAL_NORM and not head.isdigit():
                raise PackageError(f"keep_fp32: {part!r} is not an LLM layer number, {LAYERS}.N[.module] or "
                                   f"{FINAL_NORM}")
            if part != FINAL_NORM and not int(head) < n_layers:
                raise PackageError(f"keep_fp32: {part!r}: the LLM has layers 0..{n_layers - 1}")
            names.append(part)
    if f"{LAYERS}.{n_layers - 1}" in names and FINAL_NORM not in names:
        names.append(FINAL_NORM)
    # a module under another kept one is kept already
    names = sorted({n for n in names if not any(n.startswith(o + ".") for o in names)})
    return tuple(names), source


def _cast_floats(x, dtype: torch.dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast_floats(v, dtype) for v in x)
    return x


def _module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def apply_keep_fp32(model: torch.nn.Module, names: tuple[str, ...], dtype: torch.dtype) -> list:
    """Run the modules ``names`` of a model cast to ``dtype`` in float32 (their parameters are made float32;
    :func:`cast_parameters` with ``keep_fp32`` does it from the stored values): each kept module's floating
    inputs are cast to float32. The residual stream stays float32 from a kept layer to the next one: every LLM
    layer casts its input to its own dtype, so a run of kept layers never passes through ``dtype``, and the final
    norm and LM head do the same. A kept module inside a layer (``...layers.1.mlp``) casts its output back to
    ``dtype``. Returns the hook handles."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise PackageError(f"keep_fp32: no module {unknown[0]!r} in this model (e.g. {LAYERS}.0, "
                           f"{LAYERS}.0.mlp, {LAYERS}.0.self_attn, {FINAL_NORM})")
    stream = {n for n in modules if n == FINAL_NORM or (n.startswith(LAYERS + ".") and n[len(LAYERS) + 1:].isdigit())}
    handles = []

    def cast_inputs(module, args, kwargs):
        dt = _module_dtype(module)
        return (_cast_floats(args, dt), _cast_floats(kwargs, dt)) if dt is not None else None

    for name in names:
        with torch.no_grad():
            for p in modules[name].parameters():
                if p.is_floating_point():
                    p.data = p.data.float()
        if name not in stream:
            handles.append(modules[name].register_forward_hook(lambda m, a, out: _cast_floats(out, dtype)))
    # every layer (kept or not), the kept norm and the LM head take their input in their own dtype
    heads = [n for n in modules if n in stream and (n != FINAL_NORM or n in names)] + ["llm.lm_head"]
    for name in {*names, *heads}:
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(cast_inputs, with_kwargs=True))
    return handles


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
               model_class=None, keep_fp32=None, **kwargs):
    """Load a package the way the runtime's commands do (``osum-infer``, ``osum-serve``, the Ray actors).

    ``device``: ``auto`` (cuda, then npu, then cpu; the choice and its reason are logged and kept as
    ``model.device_reason``), ``cuda[:N]``, ``npu[:N]``, ``cpu``; ``device_map=`` (transformers') is passed through
    instead when given. ``dtype``: ``auto`` (float32 on CPU, the package dtype on accelerators, float16 where bf16
    is missing), ``fp32``, ``fp16``, ``bf16``. On an NPU the LLM's fused kernels are switched on
    (``npu_fusions``). A float16 model without a passing ``calibrate-fp16`` report beside the package is warned
    about, unless ``keep_fp32`` keeps every layer that report does not call safe. ``keep_fp32``: LLM modules
    run in float32 when ``dtype`` is float16/bf16 (``"auto"``: as the package's calibration report advises; a
    report's path; layer numbers or module names; :func:`keep_fp32_modules`). ``parts="audio"`` reads only
    the audio tower's tensors (encoder, adapter): the LLM stays on the meta device and is unusable (what ONNX
    export of the tower needs, ~0.3 B instead of 8 B parameters).

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
    n_layers = int(pkg.text_config.get("num_hidden_layers", 0))
    keep, keep_source = keep_fp32_modules(keep_fp32, root, n_layers)
    if keep and dt == torch.float32:
        log.info("osum_torch_infer: keep_fp32 %s: the model is float32 already", list(keep))
        keep = ()
    if keep and parts == "audio":
        raise ValueError("keep_fp32 applies to the LLM, which parts='audio' does not load")
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
        # with layers kept in float32: read at the stored dtype, then cast all but those (from the stored values)
        model = model_class.load_package(root, *model_args, dtype=None if keep else dt,
                                         device_map=device_map or dev, **kwargs)
        if keep:
            cast_parameters(model, dt, root, keep_fp32=keep)
            apply_keep_fp32(model, keep, dt)
            log.info("osum_torch_infer: %s in float32 (%s), the rest %s", list(keep), keep_source,
                     str(dt).replace("torch.", ""))
        if dev.type == "npu" and npu_fusions:
            apply_npu_fusions(model.llm)
    model.device_reason = why
    model.keep_fp32 = keep
    warning = (pkg.metadata.get("prompts") or {}).get("warning")
    if warning:
        log.warning("osum_torch_infer: %s: %s", root, warning)
    if dt == torch.float16:
        from .calibrate import REPORT, advised_fp32_layers, passing_report, read_report

        covered = keep_source != "given" and keep_source != "none"  # a report's advice is what is kept
        if keep and not covered and (root / REPORT).is_file():
            try:  # names given: quiet when they include what the package's report advises
                covered = {f"{LAYERS}.{i}" for i in advised_fp32_layers(read_report(root / REPORT))} <= set(keep)
            except ValueError:
                pass
        if not covered and not passing_report(root):
            log.warning("osum_torch_infer: %s runs in float16 without a passing %s next to it: Qwen2 activations and "
                        "attention scores can exceed 65504 (the 310P saturates silently); run "
                        "`osum-infer calibrate-fp16 --model %s --data LIST` on CPU first (then load with --keep-fp32 "
                        "auto to keep the layers it names in float32)", root, REPORT, root)
    return model
