"""``osum-infer --ray``: the same pipeline as a Ray Data job.

The driver (this process) reads the list, takes its shard, skips what ``--resume`` finds done, and writes the
results file exactly as a plain run does (:class:`~osum_torch_infer.bulk.Journal`, in input order: Ray Data's
``preserve_order``). The decoding runs in ``map_batches`` over a pool of actors, one per device: each actor
(:class:`Decoder`) loads the package once and runs :func:`osum_torch_infer.pipeline.run` on its batches of
utterances. An actor asks Ray for one GPU (``cuda``) or one ``NPU`` (Ascend), so Ray sets the actor's
``CUDA_VISIBLE_DEVICES`` / ``ASCEND_RT_VISIBLE_DEVICES`` and its ``cuda`` / ``npu`` is its own device; on
``cpu`` each actor takes one CPU. Audio paths must be readable from every node (a shared file system). The
driver imports neither torch nor the model: Ray and Ray Data (``pip install "ray[data]"``) are needed on the
driver and the workers, not on plain runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Callable, Sequence

import numpy as np

from .bulk import record_line
from .pipeline import Item

ROWS_PER_CALL = 4  # a map_batches call decodes up to batch_size x this many utterances (lengths sorted inside)


def item_row(index: int, item: Item) -> dict:
    """An item as a Ray Data row (JSON text: every field is a str, a number, None or the tar member triple)."""
    if item.audio is not None:
        raise ValueError(f"{item.key}: items holding their audio in memory cannot go to Ray workers")
    return {"index": index, "item": json.dumps(dataclasses.asdict(item), ensure_ascii=False)}


def row_item(text: str) -> Item:
    d = json.loads(text)
    if d.get("member") is not None:
        d["member"] = tuple(d["member"])
    return Item(**d)


class Decoder:
    """A Ray actor's work: the package loaded once, then ``pipeline.run`` over each batch of rows. Returns each
    row's results line (``record_line``; empty for a failed file in the text format) and whether it failed."""

    def __init__(self, model: str, device: str, dtype: str, npu_fusions: bool, fmt: str, seed: int | None,
                 options: dict, keep_fp32: str | None = None):
        from .loading import load_model

        if seed is not None:
            import torch

            torch.manual_seed(seed)
        self.model = load_model(model, device=device, dtype=dtype, npu_fusions=npu_fusions, keep_fp32=keep_fp32)
        self.fmt, self.options = fmt, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .pipeline import run

        items = [row_item(str(s)) for s in batch["item"]]
        lines, errors = [], []
        for r in run(self.model, items, progress=False, **self.options):
            lines.append(record_line(r, self.fmt) or b"")
            errors.append("error" in r)
        return {"index": np.asarray(batch["index"]), "line": np.array(lines, dtype=object),
                "error": np.array(errors, dtype=bool)}


def actor_resources(device: str, cluster: dict[str, float]) -> tuple[str, dict[str, Any], int]:
    """``(the actors' device, map_batches resource arguments, default actor count)`` for ``--device`` on a cluster
    with ``cluster`` resources (``ray.cluster_resources()``): one actor per GPU / NPU, or per node on CPU."""
    if device not in ("auto", "cuda", "npu", "cpu"):
        raise ValueError(f"--device {device!r} with --ray: expected auto, cuda, npu or cpu (each actor is given its "
                         f"own device by Ray)")
    gpus, npus = int(cluster.get("GPU", 0)), int(cluster.get("NPU", 0))
    if device == "auto":
        device = "cuda" if gpus else "npu" if npus else "cpu"
    if device == "cuda":
        if not gpus:
            raise ValueError("--device cuda with --ray: the Ray cluster has no GPU resources")
        return "cuda", {"num_gpus": 1}, gpus
    if device == "npu":
        if not npus:
            raise ValueError("--device npu with --ray: the Ray cluster has no NPU resources (start Ray on the "
                             "Ascend hosts with torch_npu installed, or pass --resources='{\"NPU\": N}')")
        return "npu", {"resources": {"NPU": 1}}, npus
    nodes = sum(1 for k in cluster if k.startswith("node:") and not k.startswith("node:__internal"))
    return "cpu", {"num_cpus": 1}, max(1, nodes)


def run_ray(todo: Sequence[Item], write: Callable[[bytes], None], *, model: str, device: str, dtype: str,
            npu_fusions: bool, fmt: str, seed: int | None, options: dict, batch_size: int, actors: int | None,
            address: str | None, progress: bool, keep_fp32: str | None = None) -> tuple[int, int]:
    """Decode ``todo`` on Ray (``address``: a running cluster; ``None``: ``RAY_ADDRESS`` or a local one, shut down
    at the end) and ``write`` each result's line in input order as it comes back. Returns ``(ok, failed)``."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ValueError(f"--ray needs Ray Data: pip install \"ray[data]\" ({e})") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    try:
        dev, remote, default = actor_resources(device, ray.cluster_resources())
        n = actors or default
        print(f"osum-infer: Ray Data, {n} actor(s) on {dev}, {len(todo)} utterance(s)", file=sys.stderr)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the results file in input order, as a plain run writes it
        ctx.enable_progress_bars = progress
        ctx.print_on_execution_start = False
        rows = max(1, min(batch_size * ROWS_PER_CALL, math.ceil(len(todo) / n)))  # every actor gets work
        ds = ray.data.from_items([item_row(i, it) for i, it in enumerate(todo)],
                                 override_num_blocks=max(1, math.ceil(len(todo) / rows)))
        ds = ds.map_batches(Decoder, batch_size=rows, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=n),
                            fn_constructor_kwargs=dict(model=model, device=dev, dtype=dtype, npu_fusions=npu_fusions,
                                                       fmt=fmt, seed=seed, options=options, keep_fp32=keep_fp32),
                            **remote)
        ok = failed = 0
        expect = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for index, line, error in zip(batch["index"], batch["line"], batch["error"]):
                if int(index) != expect:  # preserve_order is what keeps the file in input order: check it
                    raise RuntimeError(f"Ray Data returned utterance {int(index)} where {expect} was expected")
                expect += 1
                if line:
                    write(bytes(line))
                ok, failed = ok + (not error), failed + bool(error)
        if expect != len(todo):
            raise RuntimeError(f"Ray Data returned {expect} of {len(todo)} utterances")
        return ok, failed
    finally:
        if started:
            ray.shutdown()
