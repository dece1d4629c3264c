"""``osum-convert average``: the mean of the weights of several steps of an ``osum-train`` run -> a converter
checkpoint (as wenet's ``average_model.py``; OSUM's released models are averages of a run's last checkpoints).

Streams one leaf at a time, and within a leaf one block (a layer of a stacked variable, or a band of rows of at most
``stream.BLOCK_BYTES`` as float64) at a time: that block of each of the N steps is read in turn and added to a
float64 sum, which is divided by N and cast back to the stored dtype, so memory holds about one float64 block and one
stored block, never N models (nor one). Integer (non-float)
leaves must be equal in every step. One step is copied bit for bit; a leaf equal in every step (e.g. the frozen LLM)
comes out bit-identical too (N copies of a float32 or bfloat16 value sum exactly in float64).

The output is a converter checkpoint (step 0, as ``osum-convert import-*`` writes): ``params`` in the stored dtypes,
the ``config`` of the newest averaged step, and the OSUM key layout, extras and prompts that ``export-osum`` and
``export-torch`` would use for the run itself (from the converter checkpoint the run started from, or OSUM's
canonical layout for a run trained from scratch), so exporting the average is exporting the run.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from .. import checkpoint as ck
from ..checkpoint.tree import CheckpointMismatch
from ..config import RUNTIME_MODEL_KEYS, Config
from .osum_layout import osum_export_source
from .stream import BLOCK_BYTES, Progress, write_checkpoint_atomic



def _parse_steps(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise ck.CheckpointError(f"--steps {text!r}: expected step numbers separated by commas, e.g. 800,900,1000")
    return [int(p) for p in parts]


def choose_steps(run: str | Path, steps: str | Sequence[int] | None = None,
                 last: int | str | None = None) -> tuple[Path, list[int]]:
    """``(checkpoint root, sorted steps)`` to average: ``steps`` (a list or ``"a,b,c"``) or the newest ``last``.
    Raises :class:`~osum_jax.checkpoint.CheckpointError` (one line) on a missing run, an unknown step, ``last``
    larger than the run's step count, or both / neither of ``steps`` and ``last``."""
    if (steps is None) == (last is None):
        raise ck.CheckpointError("give exactly one of --steps A,B,C or --last N")
    root, _ = ck.resolve(run)
    have = ck.steps(root)
    if steps is not None:
        chosen = _parse_steps(steps) if isinstance(steps, str) else [int(s) for s in steps]
        twice = sorted({s for s in chosen if chosen.count(s) > 1})
        if twice:
            raise ck.CheckpointError(f"--steps: step {twice[0]} is given twice")
        unknown = [s for s in chosen if s not in have]
        if unknown:
            raise ck.CheckpointError(f"{root}: no step {unknown[0]} (steps: {have})")
        return root, sorted(chosen)
    n = str(last).strip()
    if not n.isdigit() or int(n) < 1:
        raise ck.CheckpointError(f"--last {last!r}: expected a positive number of steps")
    if int(n) > len(have):
        raise ck.CheckpointError(f"--last {int(n)}: {root} has only {len(have)} step(s): {have}")
    return root, have[-int(n):]


def check_same_model(cfgs: dict[int, Config]) -> None:
    """Every step's ``model`` section equals the first one's (the settings in :data:`osum_jax.config.RUNTIME_MODEL_KEYS` aside);
    raises :class:`CheckpointMismatch` naming the two steps and the first differing key."""
    (s0, c0), *rest = cfgs.items()
    a = ck.flatten(c0.to_dict()["model"], "model.")
    for s, c in rest:
        b = ck.flatten(c.to_dict()["model"], "model.")
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RUNTIME_MODEL_KEYS)]
        if diff:
            k = diff[0]
            more = f" (and {len(diff) - 1} more key(s))" if len(diff) > 1 else ""
            raise CheckpointMismatch(f"steps {s0} and {s} hold different models: {k} is {a.get(k)!r} at step {s0} "
                                     f"and {b.get(k)!r} at step {s}{more}; average only steps of one model")


def _block_plan(shape: tuple[int, ...], max_elems: int) -> tuple[tuple[int, ...], list[tuple]]:
    """``(block shape, indices)``: the whole array if it has at most ``max_elems`` elements, else bands along the
    first axis whose trailing axes fit (a layer of a stacked variable, rows of a matrix), leading axes indexed
    one by one (an int index drops that axis from the block, on reading and on writing alike)."""
    if math.prod(shape) <= max_elems or not shape:
        return shape, [()]
    a = next(i for i in range(len(shape)) if math.prod(shape[i + 1:]) <= max_elems)
    band = max(1, max_elems // math.prod(shape[a + 1:]))
    block_shape = (1,) * a + (min(band, shape[a]),) + tuple(shape[a + 1:])
    indices = [lead + (slice(start, min(start + band, shape[a])),)
               for lead in itertools.product(*(range(n) for n in shape[:a]))
               for start in range(0, shape[a], band)]
    return block_shape, indices


def _is_float(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _averaged_leaf(name: str, sources: list[tuple[int, Path, str, dict, tuple]], shape: tuple[int, ...], dtype,
                   bar: Progress) -> ck.StreamedArray:
    """The mean over ``sources`` (``(step, root, weights item, leaf metadata, store format)``) of leaf ``name``."""
    n = len(sources)
    block_shape, indices = _block_plan(shape, max(1, BLOCK_BYTES // 8))
    floating = _is_float(dtype)

    def blocks():
        leaves = [(s, ck.LazyLeaf(ck.open_leaf(root, s, name, item, meta, fmt), f"{root / str(s) / item}:{name}"))
                  for s, root, item, meta, fmt in sources]
        for index in indices:
            (s0, first), *rest = leaves
            a = first[index]
            if n == 1:
                out = a
            elif floating:
                acc = a.astype(np.float64)
                for _, leaf in rest:
                    acc += leaf[index].astype(np.float64)
                acc /= n
                out = acc.astype(dtype)
                del acc
            else:
                for s, leaf in rest:
                    if not np.array_equal(leaf[index], a):
                        raise CheckpointMismatch(f"{name}: a {np.dtype(dtype).name} tensor, which cannot be averaged, "
                                                 f"differs between steps {s0} and {s}")
                out = a
            yield index, np.ascontiguousarray(out)
            del a, out
        bar.tensor()

    return ck.StreamedArray(shape, dtype, blocks, block_shape)


def _check_out(out: Path, root: Path) -> None:
    o, r = out.resolve(), root.resolve()
    if o == r or o in r.parents or r in o.parents:
        raise ck.CheckpointError(f"--out {out} would overwrite or sit inside the checkpoints being averaged ({root}); "
                              f"choose a path outside {r}")


def average(run: str | Path, *, out: str | Path, steps: str | Sequence[int] | None = None,
            last: int | str | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Average the weights of ``steps`` (or the newest ``last`` steps) of ``run`` into the converter checkpoint
    ``out`` (written to a temporary sibling, renamed into place when complete; refused if it exists, unless
    ``force``). Returns a summary (tensors, bytes, steps, where the key layout came from)."""
    root, chosen = choose_steps(run, steps, last)
    out = Path(out)
    _check_out(out, root)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    cfgs = {s: ck.read_config(root, s) for s in chosen}
    check_same_model(cfgs)
    newest = chosen[-1]
    cfg = cfgs[newest]
    sources = []
    for s in chosen:
        item = ck.weights_item(root, s)
        sources.append((s, root, item, ck.leaf_metadata(root, s, item), ck.item_store_format(root / str(s) / item)))
    ref_meta = sources[-1][3]
    ck.check_leaves(ref_meta, cfg, f"{root / str(newest)}/{sources[-1][2]}")  # names and shapes of the model
    for s, _, item, meta, _ in sources[:-1]:
        if set(meta) != set(ref_meta):  # the full list of what is missing / unexpected
            ck.check_leaves(meta, cfg, f"{root / str(s)}/{item}")
        for name, m in ref_meta.items():
            if tuple(meta[name].shape) != tuple(m.shape):
                raise CheckpointMismatch(f"{name}: shape {tuple(meta[name].shape)} at step {s} != "
                                         f"{tuple(m.shape)} at step {newest}")
            if np.dtype(meta[name].dtype) != np.dtype(m.dtype):
                raise CheckpointMismatch(f"{name}: stored as {np.dtype(meta[name].dtype).name} at step {s} and as "
                                         f"{np.dtype(m.dtype).name} at step {newest}; cannot average one tensor "
                                         f"stored in two dtypes")
    # the key layout, extras and prompts an export of the run itself would use
    src = osum_export_source(root, newest)
    layout = {k: v for k, v in src.layout.items() if k not in ("step", "format")}
    layout["averaged"] = {"run": str(root), "steps": chosen, "layout_from": src.layout_origin}
    prompts = ck.read_prompts(root, newest)
    shapes = {name: tuple(int(d) for d in m.shape) for name, m in ref_meta.items()}
    dtypes = {name: np.dtype(m.dtype) for name, m in ref_meta.items()}
    extras = {k: ck.StreamedArray.of(np.asarray(v)) for k, v in src.extras.items()}
    total = sum(math.prod(shapes[k]) * dtypes[k].itemsize for k in shapes)
    bar = Progress("average", total + sum(v.nbytes for v in extras.values()), len(shapes), progress)
    try:
        params = {name: _averaged_leaf(name, sources, shapes[name], dtypes[name], bar) for name in shapes}
        write_checkpoint_atomic(out, force, params, cfg, extras, layout, bar, prompts=prompts)
    finally:
        bar.close()
    return {"tensors": len(shapes), "bytes": total, "steps": chosen, "root": str(root),
            "layout": src.layout_origin}
