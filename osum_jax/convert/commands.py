"""The conversions behind ``osum-convert`` as Python functions: import-osum, import-hf, export-osum, inspect.

Every import first checks the complete key/shape plan against the config (reading only headers), then streams
the tensors one block at a time into the orbax checkpoint (see :mod:`osum_jax.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from ..config import Config, ConfigError, config_from_dict, load_config
from ..data.text import PromptBook
from .. import checkpoint as ck
from .hf import QWEN2_TOP, WHISPER_LAYER, WHISPER_TOP, normalize_peft_key, qwen2_layer_table
from .osum_pt import (ALIASES, _BY_FN, Entry, canonical_keys, export_sources, extra_shapes, normalize_osum_key,
                      osum_table, plan_import)
from .sources import (SafetensorsSource, SourceError, TensorSource, TorchPtSource, dtype_name, file_size,
                      np_dtype, row_blocks, torch_dtype)
from ..checkpoint.tree import CheckpointMismatch, flat_variables

BLOCK_BYTES = 64 << 20  # large matrices are streamed in bands of at most this many bytes


class Progress:
    """tqdm bar over bytes with a tensor counter (silent when ``enabled`` is False)."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
        self.tensors, self.total_tensors = 0, total_tensors
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, dynamic_ncols=True)
            self._postfix()

    def _postfix(self):
        self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors")

    def bytes(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def tensor(self, n: int = 1) -> None:
        self.tensors += n
        if self.bar is not None:
            self._postfix()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -- streaming a planned leaf ---------------------------------------------------------------------------------------


def _bands(src: TensorSource, key: str, tr) -> list[slice] | None:
    """Row bands of a large 2-D source tensor (``id``/``linear`` transforms), or None to take it whole."""
    shape = src.shape(key)
    if len(shape) != 2 or tr.name not in ("id", "linear") or src.nbytes(key) <= BLOCK_BYTES:
        return None
    return list(row_blocks(shape[0], src.nbytes(key) // shape[0], BLOCK_BYTES))


def _streamed_leaf(src: TensorSource, items: Sequence[tuple[str, Entry]], shape: tuple[int, ...], dtype: str,
                   progress: Progress) -> ck.StreamedArray:
    """A leaf whose blocks come from ``src``: one per layer, split into row bands of at most ``BLOCK_BYTES``
    for large matrices (torch rows are the columns of a JAX ``[in, out]`` kernel)."""
    npdt = np_dtype(dtype)
    lead = (0,) if items[0][1].layer is not None else ()
    key0, e0 = items[0]
    bands0 = _bands(src, key0, e0.transform)
    if bands0 is None:
        block_shape = (1,) * len(lead) + tuple(shape[len(lead):])
    else:
        width = bands0[0].stop - bands0[0].start
        inner = (width, shape[-1]) if e0.transform.name == "id" else (shape[-2], width)
        block_shape = (1,) * len(lead) + inner

    def blocks():
        for key, e in items:
            at = (e.layer,) if lead else ()
            bands = _bands(src, key, e.transform)
            if bands is None:
                yield at, e.transform.forward(src.numpy(key))
            else:
                for rows in bands:
                    part = src.numpy(key, rows)
                    if e.transform.name == "id":
                        yield at + (rows,), part
                    else:
                        yield at + (slice(None), rows), np.ascontiguousarray(part.T)
                    src.release(key)
            src.release(key)
            progress.tensor()
    return ck.StreamedArray(shape, npdt, blocks, block_shape)


def _array_leaf(array: np.ndarray, progress: Progress | None = None) -> ck.StreamedArray:
    def blocks():
        yield (), array
        if progress is not None:
            progress.tensor()
    return ck.StreamedArray(array.shape, array.dtype, blocks)


def _check_aliases(src: TensorSource, aliases: Mapping[str, str]) -> None:
    """OSUM saves ``embed_tokens.weight``/``lm_head.weight`` as aliases: they must equal their originals."""
    for alias, target in aliases.items():
        if src.same_storage(alias, target):
            continue
        n = src.shape(target)[0] if src.shape(target) else 1
        row_bytes = src.nbytes(target) // max(n, 1)
        for rows in row_blocks(n, row_bytes, BLOCK_BYTES):
            a, b = src.numpy(alias, rows), src.numpy(target, rows)
            if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                raise CheckpointMismatch(
                    f"{src.path}: {alias} differs from {target} (rows {rows.start}..{rows.stop}); OSUM saves them "
                    f"as one tensor, so this file was edited or is corrupt")
            src.release(alias)
            src.release(target)


def _write(out: str | Path, force: bool, params, cfg: Config, extras, layout, progress: Progress,
           prompts: dict | None = None) -> None:
    with ck.atomic_output(out, force) as tmp:
        ck.write_checkpoint(tmp, params, cfg, extras, layout, progress=progress.bytes, prompts=prompts)


def _sum_bytes(leaves: Mapping[str, ck.StreamedArray]) -> int:
    return sum(v.nbytes for v in leaves.values())


# -- import-osum ------------------------------------------------------------------------------------------------------


def import_osum(pt: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (), *,
                out: str | Path, force: bool = False, progress: bool = True, osum_config: str | Path | None = None,
                llm_config: str | Path | None = None, prompts: str | Path | None = None) -> dict[str, Any]:
    """OSUM's flat ``.pt`` -> JAX checkpoint. Returns a summary (tensors, bytes).

    ``osum_config`` (OSUM's model YAML) and ``llm_config`` (a Qwen2 directory or ``config.json``) give the
    settings; every one of them must agree with ``config`` + ``overrides`` (a list of differences otherwise).
    ``prompts`` (OSUM's ``prompt_config.yaml`` format) is stored with the checkpoint: export-torch ships it and
    osum-train uses it by default. The files' SHA-256 are recorded in the checkpoint's layout."""
    from .osum_config import config_from_sources, osum_yaml_fields, qwen2_config_path, qwen2_fields, sha256

    if config is None and osum_config is None:
        raise ConfigError("import-osum needs --osum-config (OSUM's model YAML) and/or --config")
    sources = []
    origin: dict[str, Any] = {}
    if osum_config is not None:
        sources.append((str(osum_config), osum_yaml_fields(osum_config)))
        origin["osum_config"] = {"path": str(Path(osum_config).resolve()), "sha256": sha256(osum_config)}
    if llm_config is not None:
        sources.append((str(qwen2_config_path(llm_config)), {"model": {"llm": qwen2_fields(llm_config)}}))
        origin["llm_config"] = {"path": str(qwen2_config_path(llm_config).resolve()),
                                "sha256": sha256(qwen2_config_path(llm_config))}
    cfg = config_from_sources(config, overrides, sources) if sources else load_config(config, overrides)
    book = None
    if prompts is not None:
        book = PromptBook.load(prompts)  # validates (raises naming the file)
        origin["prompts"] = {"path": str(Path(prompts).resolve()), "sha256": sha256(prompts)}
        book = {"format": "osum-prompts/1", "source": origin["prompts"]["path"], "sha256": origin["prompts"]["sha256"],
                "prompts": book.prompts}
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    with TorchPtSource(pt) as src:
        meta = {k: (src.shape(k), src.dtype(k)) for k in src.keys()}
        plan = plan_import(meta, cfg.model, ck.model_shapes(cfg), source=str(pt))
        _check_aliases(src, plan.aliases)
        n_tensors = len(meta) - len(plan.aliases)
        total = sum(src.nbytes(k) for k in meta if k not in plan.aliases)
        bar = Progress("import-osum", total, n_tensors, progress)
        try:
            params = {path: _streamed_leaf(src, items, plan.shapes[path], plan.dtypes[path], bar)
                      for path, items in plan.leaves.items()}
            extras = {k: _array_leaf(np.array(src.numpy(k)), bar) for k in plan.extras}
            layout = {"source": {"kind": "osum-pt", "path": str(Path(pt).resolve()), "bytes": file_size(pt),
                                 **origin}, "keys": plan.layout}
            _write(out, force, params, cfg, extras, layout, bar, prompts=book)
        finally:
            bar.close()
    return {"tensors": n_tensors, "bytes": total, "aliases": len(plan.aliases), "extras": len(plan.extras)}


# -- import-hf ------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise SourceError(f"{path}: invalid JSON ({e})") from None


def hf_model_fields(whisper_dir: Path, qwen2_dir: Path) -> dict[str, Any]:
    """Config fields implied by the HF ``config.json`` files (``model.encoder.*`` and ``model.llm.*``)."""
    w = _read_json(Path(whisper_dir) / "config.json")
    try:
        enc = {"num_mel_bins": w["num_mel_bins"], "d_model": w["d_model"], "num_layers": w["encoder_layers"],
               "num_heads": w["encoder_attention_heads"], "ffn_dim": w["encoder_ffn_dim"],
               "max_source_positions": w["max_source_positions"]}
    except KeyError as e:
        raise SourceError(f"{whisper_dir}/config.json: no {e.args[0]!r} (is this a Whisper checkpoint?)") from None
    from .osum_config import qwen2_fields

    llm = qwen2_fields(qwen2_dir)
    return {"encoder": enc, "llm": llm}


def _hf_config(whisper_dir, qwen2_dir, config, overrides) -> Config:
    fields = hf_model_fields(whisper_dir, qwen2_dir)
    if config is None:
        cfg = config_from_dict({"model": fields}, overrides, source="HF config.json files")
        where = "HF config.json files"
    else:
        cfg = load_config(config, overrides)
        where = str(config)
    bad = []
    for section, values in fields.items():
        sub = getattr(cfg.model, section)
        for k, v in values.items():
            have = sub.resolved_head_dim if (section, k) == ("llm", "head_dim") else getattr(sub, k)
            if (have != v) if not isinstance(v, float) else not math.isclose(have, v, rel_tol=1e-9):
                bad.append(f"model.{section}.{k}: {where} has {have!r}, the HF checkpoint has {v!r}")
    if bad:
        raise ConfigError("config does not match the HF checkpoints:\n  " + "\n  ".join(bad))
    return cfg


def _match(entries: Sequence[Entry], src: TensorSource, keys: Mapping[str, str], shapes, *, source: str,
           problems: list[str]) -> dict[str, list[tuple[str, Entry]]]:
    """Match table entries to source keys (``keys``: normalised name -> source key); record problems."""
    leaves: dict[str, list[tuple[str, Entry]]] = defaultdict(list)
    missing = []
    for e in entries:
        if e.torch_key not in keys:
            missing.append(e.torch_key)
            continue
        key = keys[e.torch_key]
        jshape = tuple(shapes[e.jax_path])
        want = e.transform.torch_shape(jshape[1:] if e.layer is not None else jshape)
        if src.shape(key) != want:
            problems.append(f"{source}: {key} has shape {list(src.shape(key))}, the config needs {list(want)}")
        leaves[e.jax_path].append((key, e))
    if missing:
        problems.append(f"{source}: {len(missing)} missing key(s): {missing[:12]}")
    used = {keys[e.torch_key] for e in entries if e.torch_key in keys}
    return leaves, used


def _hf_entries(cfg: Config) -> tuple[list[Entry], list[Entry]]:
    m = cfg.model
    whisper = [Entry(t, f"encoder.{j}", None, _BY_FN[f]) for j, t, f in WHISPER_TOP]
    whisper += [Entry(f"layers.{i}.{t}", f"encoder.layers.{j}", i, _BY_FN[f])
                for i in range(m.encoder.num_layers) for j, t, f in WHISPER_LAYER]
    qwen = [Entry(t, f"llm.{j}", None, _BY_FN[f]) for j, t, f in QWEN2_TOP
            if not (j == "lm_head" and m.llm.tie_word_embeddings)]
    qwen += [Entry(f"model.layers.{i}.{t}", f"llm.layers.{j}", i, _BY_FN[f])
             for i in range(m.llm.num_layers) for j, t, f in qwen2_layer_table(m.llm, None)]
    return whisper, qwen


def _fresh_parts(cfg: Config, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Adapter, bos/eos table and LoRA adapters initialised as the model does (LoRA B = 0)."""
    from ..models import Adapter

    m = cfg.model
    rngs = nnx.Rngs(seed)
    adapter = Adapter(m.encoder.d_model, m.llm.hidden_size, m.adapter, dtype=m.dtype, param_dtype=m.param_dtype,
                      rngs=rngs)
    out = {f"adapter.{k}": np.asarray(v.get_value()) for k, v in flat_variables(adapter).items()}
    pdt = np_dtype(m.param_dtype)
    key = jax.random.key(seed + 1)
    k_speech, k_lora = jax.random.split(key)
    out["speech_embed"] = np.asarray(m.llm.initializer_range * jax.random.normal(
        k_speech, shapes["speech_embed"], np.float32)).astype(pdt)
    for i, path in enumerate(sorted(p for p in shapes if p.endswith((".lora_a", ".lora_b")))):
        shape = shapes[path]
        if path.endswith(".lora_b"):
            out[path] = np.zeros(shape, pdt)
        else:  # peft / lora.py: A ~ U(-1/sqrt(in), 1/sqrt(in)), shape [layers, in, r]
            bound = 1.0 / math.sqrt(shape[-2])
            out[path] = np.asarray(jax.random.uniform(jax.random.fold_in(k_lora, i), shape, np.float32,
                                                      -bound, bound)).astype(pdt)
    return out


def _fresh_extras(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """OSUM's unused ``ln_speech`` (LayerNorm init) and ``speaker_head`` (torch Linear init), float32."""
    shapes = extra_shapes(cfg.model)
    rng = np.random.default_rng(seed + 2)
    bound = 1.0 / math.sqrt(cfg.model.llm.hidden_size)
    return {"ln_speech.weight": np.ones(shapes["ln_speech.weight"], np.float32),
            "ln_speech.bias": np.zeros(shapes["ln_speech.bias"], np.float32),
            "speaker_head.weight": rng.uniform(-bound, bound, shapes["speaker_head.weight"]).astype(np.float32),
            "speaker_head.bias": rng.uniform(-bound, bound, shapes["speaker_head.bias"]).astype(np.float32)}


def _whisper_prefix(keys: Sequence[str]) -> str:
    for p in ("model.encoder.", "encoder."):
        if any(k.startswith(p) for k in keys):
            return p
    return ""


def import_hf(whisper: str | Path, qwen2: str | Path, config: str | Path | None = None,
              overrides: Sequence[str] = (), *, out: str | Path, force: bool = False, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """HF Whisper (encoder only) + HF Qwen2 -> JAX checkpoint with a fresh adapter, bos/eos and LoRA (B = 0).

    Without ``config`` the encoder/LLM sections come from the HF ``config.json`` files (the rest are OSUM's
    defaults); with one, its values must agree with them.
    """
    cfg = _hf_config(Path(whisper), Path(qwen2), config, overrides)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    shapes = ck.model_shapes(cfg)
    w_src, q_src = SafetensorsSource(whisper), SafetensorsSource(qwen2)
    w_entries, q_entries = _hf_entries(cfg)
    problems: list[str] = []
    prefix = _whisper_prefix(w_src.keys())
    w_keys = {k[len(prefix):]: k for k in w_src.keys() if k.startswith(prefix)}
    w_leaves, w_used = _match(w_entries, w_src, w_keys, shapes, source=str(whisper), problems=problems)
    scope = "model.encoder." if prefix == "model.encoder." else prefix
    extra_w = sorted(k for k in w_src.keys() if k.startswith(scope) and k not in w_used) if scope else \
        sorted(k for k in w_src.keys() if k not in w_used)
    if extra_w:
        problems.append(f"{whisper}: {len(extra_w)} unexpected encoder key(s): {extra_w[:12]}")
    q_keys: dict[str, str] = {}
    for k in q_src.keys():
        n = normalize_peft_key(k)
        if n in q_keys:
            problems.append(f"{qwen2}: {q_keys[n]} and {k} are the same tensor in two naming styles")
        q_keys[n] = k
    q_leaves, q_used = _match(q_entries, q_src, q_keys, shapes, source=str(qwen2), problems=problems)
    ignore = [r".*rotary_emb\.inv_freq"] + ([r"lm_head\.weight"] if cfg.model.llm.tie_word_embeddings else [])
    extra_q = sorted(k for k in q_src.keys() if k not in q_used
                     and not any(re.fullmatch(p, normalize_peft_key(k)) for p in ignore))
    if extra_q:
        problems.append(f"{qwen2}: {len(extra_q)} unexpected key(s): {extra_q[:12]}")
    dtypes = {}
    for src, leaves in ((w_src, w_leaves), (q_src, q_leaves)):
        for path, items in leaves.items():
            kinds = sorted({src.dtype(k) for k, _ in items})
            if len(kinds) > 1:
                problems.append(f"{path}: layers stored with different dtypes {kinds}")
            dtypes[path] = kinds[0]
    if problems:
        raise CheckpointMismatch("HF checkpoints do not match the config:\n  " + "\n  ".join(problems))

    fresh = _fresh_parts(cfg, shapes, seed)
    extras_np = _fresh_extras(cfg, seed)
    covered = set(w_leaves) | set(q_leaves) | set(fresh)
    if covered != set(shapes):
        raise CheckpointMismatch(f"internal: variables not covered {sorted(set(shapes) - covered)}")
    n_tensors = sum(len(v) for v in w_leaves.values()) + sum(len(v) for v in q_leaves.values()) + len(fresh) \
        + len(extras_np)
    bar = Progress("import-hf", 0, n_tensors, progress)
    params = {}
    for src, leaves in ((w_src, w_leaves), (q_src, q_leaves)):
        for path, items in leaves.items():
            params[path] = _streamed_leaf(src, items, shapes[path], dtypes[path], bar)
    params.update({p: _array_leaf(a, bar) for p, a in fresh.items()})
    extras = {k: _array_leaf(a, bar) for k, a in extras_np.items()}
    total = _sum_bytes(params) + _sum_bytes(extras)
    if bar.bar is not None:
        bar.bar.total = total
    # the OSUM key list this checkpoint exports to (canonical order, peft >= 0.7 names)
    layout_keys = _canonical_layout(cfg, {p: v.dtype for p, v in params.items()}, extras_np)
    layout = {"source": {"kind": "hf", "whisper": str(Path(whisper).resolve()), "qwen2": str(Path(qwen2).resolve())},
              "keys": layout_keys}
    try:
        _write(out, force, params, cfg, extras, layout, bar)
    finally:
        bar.close()
    return {"tensors": n_tensors, "bytes": total}


def _canonical_layout(cfg: Config, leaf_dtypes: Mapping[str, np.dtype], extras: Mapping[str, np.ndarray]) -> list:
    by_key = {e.torch_key: e for e in osum_table(cfg.model)}
    shapes = ck.model_shapes(cfg)
    out = []
    for key in canonical_keys(cfg.model):
        if key in ALIASES:
            e = by_key[normalize_osum_key(ALIASES[key])]
            out.append({"key": key, "dtype": dtype_name(leaf_dtypes[e.jax_path]), "role": "alias",
                        "of": ALIASES[key], "shape": list(e.transform.torch_shape(shapes[e.jax_path]))})
        elif key in extras:
            out.append({"key": key, "dtype": dtype_name(extras[key].dtype), "role": "extra",
                        "shape": list(extras[key].shape)})
        else:
            e = by_key[normalize_osum_key(key)]
            js = shapes[e.jax_path]
            out.append({"key": key, "dtype": dtype_name(leaf_dtypes[e.jax_path]), "role": "param",
                        "shape": list(e.transform.torch_shape(js[1:] if e.layer is not None else js))})
    return out


# -- export-osum ----------------------------------------------------------------------------------------------------


def _cast(a: np.ndarray, dtype: str, key: str) -> np.ndarray:
    target = np_dtype(dtype)
    if a.dtype == target:
        return a
    out = a.astype(target)
    if dtype == "float16":
        over = np.isfinite(a.astype(np.float32)) & ~np.isfinite(out.astype(np.float32))
        if over.any():
            raise OverflowError(f"{key}: {int(over.sum())} value(s) exceed the float16 range "
                                f"(max |x| = {float(np.abs(a.astype(np.float32)).max()):.4g}); export bf16 or fp32")
    return out


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _zip_records(f) -> Iterator[tuple[int, int, int, int]]:
    """``(payload offset, payload size, CRC-32, central directory entry offset)`` of each record of the zip
    archive ``f`` (a seekable binary file), in central directory order."""
    import zipfile

    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(size - 22)
    sig, _, _, _, n, cd_size, cd_off, comment = struct.unpack("<IHHHHIIH", f.read(22))
    if sig != 0x06054B50 or comment:
        raise ck.CheckpointError(f"{f.name}: unexpected zip end record")
    if cd_off == 0xFFFFFFFF or cd_size == 0xFFFFFFFF or n == 0xFFFF:  # zip64: locator, then the zip64 end record
        f.seek(size - 22 - 20)
        sig, _, end64, _ = struct.unpack("<IIQI", f.read(20))
        if sig == 0x07064B50:
            f.seek(end64)
            sig, *_, n, cd_size, cd_off = struct.unpack("<IQHHIIQQQQ", f.read(56))
        if sig != 0x06064B50:
            raise ck.CheckpointError(f"{f.name}: unexpected zip64 end record")
    infos = zipfile.ZipFile(f).infolist()  # decodes the zip64 extra fields (sizes, local header offsets)
    f.seek(cd_off)
    cd = f.read(cd_size)
    pos = 0
    for zi in infos:
        sig, = struct.unpack_from("<I", cd, pos)
        nl, el, cl = struct.unpack_from("<HHH", cd, pos + 28)
        if sig != 0x02014B50 or cd[pos + 46:pos + 46 + nl].decode() != zi.orig_filename:
            raise ck.CheckpointError(f"{f.name}: unexpected central directory entry at {cd_off + pos}")
        f.seek(zi.header_offset)
        sig, = struct.unpack("<I", f.read(4))
        f.seek(zi.header_offset + 26)
        lnl, lel = struct.unpack("<HH", f.read(4))
        if sig != 0x04034B50:
            raise ck.CheckpointError(f"{f.name}: unexpected local header at {zi.header_offset}")
        yield zi.header_offset + 30 + lnl + lel, zi.file_size, zi.CRC, cd_off + pos
        pos += 46 + nl + el + cl


def _set_crcs(path: Path, crcs: Mapping[int, int]) -> None:
    """Write the CRC-32 of the records whose payloads were filled after ``torch.save`` under ``skip_data``
    (keyed by payload offset) into their data descriptors and central directory entries, where that save
    left 0 (``torch.load`` does not check them; ``zipfile`` and other zip readers do)."""
    todo = dict(crcs)
    with open(path, "r+b") as f:
        for data, nbytes, crc, central in list(_zip_records(f)):
            if data not in todo:
                continue
            f.seek(data + nbytes)
            sig, old = struct.unpack("<II", f.read(8))
            if sig != 0x08074B50 or old != 0 or crc != 0:
                raise ck.CheckpointError(f"{path}: unexpected data descriptor at {data + nbytes}")
            new = struct.pack("<I", todo.pop(data))
            f.seek(data + nbytes + 4)
            f.write(new)
            f.seek(central + 16)
            f.write(new)
    if todo:
        raise ck.CheckpointError(f"{path}: no zip record at payload offset(s) {sorted(todo)[:5]}")


def _export_shape(e: Entry, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    js = shapes[e.jax_path]
    return tuple(e.transform.torch_shape(js[1:] if e.layer is not None else js))


@dataclass
class OsumExportSource:
    """What export-osum reads: the weights (``item`` of ``root``/``step``), their config, and the OSUM key layout
    (key order, dtypes, roles) with the extras (``ln_speech``/``speaker_head``) it came with."""

    root: Path
    step: int
    item: str  # the weights item (``params``; ``model`` in runs of the earlier layout)
    cfg: Config
    layout: dict
    extras: dict[str, np.ndarray]
    layout_origin: str  # where the layout came from, for messages


def osum_export_source(ckpt: str | Path, step: int | None = None,
                       layout_from: str | Path | None = None) -> OsumExportSource:
    """Resolve what :func:`export_osum` exports.

    * a converter checkpoint (import-osum / import-hf): its ``params`` and its own ``osum_layout``/``extras``;
    * an osum-train run directory: its ``model`` item at ``step`` (newest by default) and the layout/extras of
      the converter checkpoint it started from (``train.init_from``, followed through runs started from runs);
      a run trained from scratch gets OSUM's canonical key order (as import-hf writes it) with each tensor in
      its stored dtype and freshly initialised ``ln_speech``/``speaker_head`` (unused by OSUM's forward pass).

    ``layout_from`` names the converter checkpoint whose layout/extras to use instead (e.g. when the run's
    ``init_from`` moved)."""
    root, s = ck.resolve(ckpt, step)
    cfg, item = ck.read_config(root, s), ck.weights_item(root, s)
    if layout_from is not None:
        lroot, ls = ck.resolve(layout_from)
        found: tuple[Path, dict] | None = (lroot, ck.read_layout(lroot, ls))
    elif not ck.is_run_step(root, s):
        found = (root, ck.read_layout(root, s))
    else:
        found = ck.find_layout(root, s)
    if found is not None:
        lroot, layout = found
        return OsumExportSource(root, s, item, cfg, layout, ck.restore_extras(lroot, layout["step"]),
                                f"{lroot}/{layout['step']}/osum_layout")
    meta = ck.leaf_metadata(root, s, item)
    extras = _fresh_extras(cfg, 0)
    keys = _canonical_layout(cfg, {p: m.dtype for p, m in meta.items()}, extras)
    return OsumExportSource(root, s, item, cfg, {"keys": keys, "source": {"kind": "canonical"}}, extras,
                            "OSUM's canonical key order (the run has no train.init_from with an osum_layout)")


def export_osum(ckpt: str | Path, *, out: str | Path, step: int | None = None, force: bool = False,
                dtype: str | None = None, progress: bool = True,
                layout_from: str | Path | None = None) -> dict[str, Any]:
    """JAX checkpoint or osum-train run -> OSUM's flat ``.pt`` (keys, order, dtypes of the imported file; aliases
    shared). What is read from where: :func:`osum_export_source`.

    ``dtype`` (``bfloat16``/``float16``/``float32``) casts every tensor; by default each key keeps the dtype
    recorded at import (a run's trained float32 weights are then rounded to the layout's dtype, bf16 for
    OSUM's release; pass ``float32`` to keep them exact). The file is written by ``torch.save`` under ``torch.serialization.skip_data`` (pickle
    and zip records, with room reserved for the tensor bytes), then each tensor's bytes are read from the
    checkpoint one layer or band at a time and written (``pwrite``) at the offset that ``torch.load`` under
    ``FakeTensorMode`` reports for it (PyTorch's documented recipe for filling a ``skip_data`` checkpoint);
    the CRC-32 of each record is filled in last. Neither the model nor the output file is ever mapped into
    memory, so the peak RSS stays near the largest layer whatever the model size.
    """
    import torch

    if not hasattr(torch.serialization, "skip_data"):
        raise RuntimeError(f"export-osum needs torch >= 2.7 (torch.serialization.skip_data, storage offsets "
                           f"under FakeTensorMode); this is torch {torch.__version__}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    src = osum_export_source(ckpt, step, layout_from)
    root, s, item, cfg, layout, extras = src.root, src.step, src.item, src.cfg, src.layout, src.extras
    plan = export_sources(layout["keys"], cfg.model)
    meta = ck.leaf_metadata(root, s, item)
    shapes = ck.model_shapes(cfg)
    bad = [f"{p}: stored {tuple(meta[p].shape) if p in meta else None} != config {shapes[p]}" for p in shapes
           if p not in meta or tuple(meta[p].shape) != shapes[p]]
    if bad:
        raise CheckpointMismatch(f"{root / str(s)}/{item} does not match its config:\n  " + "\n  ".join(bad))
    recs = {r["key"]: r for r in layout["keys"]}
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    # shape and dtype of every stored tensor, known before any is read
    want: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for key, role, detail in plan:
        if role == "alias":
            continue
        if role == "extra":
            if key not in extras:
                raise ck.CheckpointError(f"{root}: the extras item lacks {key}")
            shape = tuple(extras[key].shape)
        else:
            shape = _export_shape(detail, shapes)
        if list(shape) != list(recs[key]["shape"]):
            raise CheckpointMismatch(f"{key}: exported shape {list(shape)} != recorded {recs[key]['shape']}")
        want[key] = (shape, np_dtype(dtype or recs[key]["dtype"]))
    for key, role, detail in plan:
        if role == "alias" and detail not in want:
            raise CheckpointMismatch(f"{key} aliases {detail}, which is not exported")
    by_leaf: dict[str, list[tuple[str, Entry]]] = defaultdict(list)
    for key, role, detail in plan:
        if role == "param":
            by_leaf[detail.jax_path].append((key, detail))
    n_tensors = len(plan)
    total = sum(math.prod(sh) * dt.itemsize for sh, dt in want.values())
    bar = Progress("export-osum", total, n_tensors, progress)

    fmt = ck.item_store_format(root / str(s) / item)

    def sources() -> Iterator[tuple[str, Iterator[np.ndarray]]]:
        """``(key, blocks)`` for each stored tensor: its bytes in order, as C-contiguous arrays of the target
        dtype (whole tensors, or row bands of at most ``BLOCK_BYTES`` for large un-stacked matrices)."""
        for path, items in by_leaf.items():
            t = ck.open_leaf(root, s, path, item, meta=meta, store_format=fmt)
            if items[0][1].layer is not None:
                for key, e in sorted(items, key=lambda x: x[1].layer):
                    yield key, iter([e.transform.inverse(t[e.layer].read().result())])
                continue
            (key, e), = items
            shape, dt = want[key]
            if e.transform.name == "linear" and len(shape) == 2:  # JAX [in, out]: torch rows are JAX columns
                yield key, (np.ascontiguousarray(t[:, band].read().result().T)
                            for band in row_blocks(shape[0], shape[1] * dt.itemsize, BLOCK_BYTES))
            elif e.transform.name == "id" and len(shape) == 2 and math.prod(shape) * 4 > BLOCK_BYTES:
                yield key, (t[band].read().result()
                            for band in row_blocks(shape[0], shape[1] * dt.itemsize, BLOCK_BYTES))
            else:
                yield key, iter([e.transform.inverse(t.read().result())])
        for key, role, _ in plan:
            if role == "extra":
                yield key, iter([extras[key]])

    try:
        with ck.atomic_output(out, force) as tmp:
            # 1. pickle + zip records, the tensor bytes left as (sparse) holes
            with FakeTensorMode():
                fake = {k: torch.empty(sh, dtype=torch_dtype(dt.name)) for k, (sh, dt) in want.items()}
            with torch.serialization.skip_data(materialize_fake_tensors=True):
                torch.save({key: fake[detail if role == "alias" else key] for key, role, detail in plan}, tmp)
            del fake
            # 2. where each tensor's bytes go (loading under FakeTensorMode reads no tensor bytes)
            with FakeTensorMode():
                offsets = {k: v.untyped_storage()._checkpoint_offset
                           for k, v in torch.load(tmp, weights_only=True).items() if k in want}
            # 3. the bytes, streamed from the checkpoint
            crcs = {}
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for key, blocks in sources():
                    shape, dt = want[key]
                    nbytes, done, crc = math.prod(shape) * dt.itemsize, 0, 0
                    for a in blocks:
                        a = np.ascontiguousarray(_cast(a, dt.name, key))
                        if a.ndim != len(shape) or a.shape[1:] != shape[1:] or done + a.nbytes > nbytes:
                            raise CheckpointMismatch(f"{key}: exported block {list(a.shape)} does not fit "
                                                     f"{list(shape)}")
                        buf = memoryview(a.reshape(-1).view(np.uint8))
                        _pwrite_all(fd, buf, offsets[key] + done)
                        crc = zlib.crc32(buf, crc)
                        done += a.nbytes
                        bar.bytes(a.nbytes)
                    if done != nbytes:
                        raise CheckpointMismatch(f"{key}: exported {done} bytes != {nbytes} for {list(shape)}")
                    if nbytes:  # an empty record has no data descriptor (and CRC-32 0)
                        crcs[offsets[key]] = crc
                    bar.tensor()
            finally:
                os.close(fd)
            bar.tensor(n_tensors - len(want))  # the aliases
            # 4. CRC-32 of the filled records
            _set_crcs(tmp, crcs)
    finally:
        bar.close()
    return {"tensors": n_tensors, "bytes": total, "layout": src.layout_origin}


# -- inspect ----------------------------------------------------------------------------------------------------------


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
