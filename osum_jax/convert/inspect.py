"""``osum-convert inspect``: what a run, a JAX checkpoint, a ``.pt`` or a safetensors file holds (headers only)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import checkpoint as ck
from ..config import Config
from .osum_pt import ALIASES
from .sources import SafetensorsSource, TorchPtSource, dtype_name, file_size, np_dtype


def _group(key: str) -> str:
    parts = key.split(".")
    if key.startswith("llama_model.base_model.model."):
        parts = ["llama_model"] + parts[3:]
    depth = 3 if parts[0] in ("llm", "encoder", "adapter", "llama_model", "model") else 2
    parts = [p for p in parts[:-1] if not p.isdigit()][:depth - 1]
    return ".".join(parts) or key


def _table(rows: dict[str, dict], title: str) -> str:
    lines = [title, f"  {'module':<44} {'tensors':>8} {'parameters':>15} {'bytes':>12}  dtypes"]
    tot_t = tot_p = tot_b = 0
    for name, r in sorted(rows.items()):
        lines.append(f"  {name:<44} {r['tensors']:>8} {r['params']:>15,} {_human(r['bytes']):>12}  "
                     f"{','.join(sorted(r['dtypes']))}")
        tot_t += r["tensors"]
        tot_p += r["params"]
        tot_b += r["bytes"]
    lines.append(f"  {'total':<44} {tot_t:>8} {tot_p:>15,} {_human(tot_b):>12}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summarise(items: Iterator[tuple[str, tuple[int, ...], str]], lora: bool = True) -> dict[str, dict]:
    rows: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0, "dtypes": set()})
    for key, shape, dt in items:
        g = _group(key)
        if lora and re.search(r"lora_[AaBb]", key):
            g += " (LoRA)"
        n = int(np.prod(shape, dtype=np.int64))
        r = rows[g]
        r["tensors"] += 1
        r["params"] += n
        r["bytes"] += n * (np_dtype(dt) if dt == "bfloat16" else np.dtype(dt)).itemsize
        r["dtypes"].add(dt)
    return rows


def _config_line(cfg: Config) -> str:
    m = cfg.model
    return (f"  config: encoder {m.encoder.num_layers}x{m.encoder.d_model}, adapter {m.adapter.num_layers} blocks, "
            f"llm {m.llm.num_layers}x{m.llm.hidden_size} (vocab {m.llm.vocab_size}), lora r={m.lora.rank} "
            f"{list(m.lora.targets)}, param_dtype {m.param_dtype}")


def inspect(path: str | Path) -> str:
    """A text report of what ``path`` holds: an ``osum-train`` run, a JAX checkpoint, an OSUM/torch ``.pt``, or a
    safetensors file/directory."""
    path = Path(path)
    if path.is_dir() and not list(path.glob("*.safetensors")):
        root, s = ck.resolve(path)
        if ck.is_run_step(root, s):
            cfg = ck.read_config(root, s)
            lines = [f"osum-train run {path} (orbax CheckpointManager); steps {ck.steps(root)}; showing step {s}",
                     f"  items: {sorted(p.name for p in (root / str(s)).iterdir() if p.is_dir())}",
                     _config_line(cfg), f"  fire_module {cfg.train.fire_module}"]
            for item, title in ((ck.weights_item(root, s), "params:"), ("opt", "optimizer state:")):
                meta = ck.leaf_metadata(root, s, item)
                lines.append(_table(_summarise(((k, tuple(v.shape), dtype_name(v.dtype)) for k, v in meta.items())),
                                    title))
            return "\n".join(lines)
        cfg = ck.read_config(root, s)
        lines = [f"JAX checkpoint {root} (orbax CheckpointManager); steps {ck.steps(root)}; showing step {s}",
                 f"  items: {sorted(p.name for p in (root / str(s)).iterdir() if p.is_dir())}", _config_line(cfg)]
        meta = ck.leaf_metadata(root, s)
        lines.append(_table(_summarise(((k, tuple(v.shape), dtype_name(v.dtype)) for k, v in meta.items())),
                            "params:"))
        if (root / str(s) / "extras").is_dir():
            ex = ck.leaf_metadata(root, s, "extras")
            lines.append(_table(_summarise(((k, tuple(v.shape), dtype_name(v.dtype)) for k, v in ex.items())),
                                "extras (OSUM tensors that are not model variables):"))
        try:
            layout = ck.read_layout(root, s)
            roles = defaultdict(int)
            for r in layout["keys"]:
                roles[r["role"]] += 1
            lines.append(f"osum_layout (step {layout['step']}): source {layout['source']}; "
                         f"{len(layout['keys'])} OSUM keys ({dict(roles)})")
        except ck.CheckpointError as e:
            lines.append(f"osum_layout: none ({e})")
        return "\n".join(lines)
    if path.is_file() and path.suffix != ".safetensors":
        with TorchPtSource(path) as src:
            keys = src.keys()
            aliases = [k for k in ALIASES if k in keys and ALIASES[k] in keys and src.same_storage(k, ALIASES[k])]
            rows = _summarise((k, src.shape(k), src.dtype(k)) for k in keys)
            return "\n".join([f"torch state dict {path} ({_human(file_size(path))}, {len(keys)} tensors)",
                              _table(rows, "tensors:"),
                              f"shared-storage aliases: {aliases}" if aliases else "shared-storage aliases: none"])
    src = SafetensorsSource(path)
    return "\n".join([f"safetensors {path} ({len(src.keys())} tensors)",
                      _table(_summarise((k, src.shape(k), src.dtype(k)) for k in src.keys()), "tensors:")])
