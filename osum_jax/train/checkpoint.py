"""orbax checkpoints of a training run: model + optimizer state + step + data-iterator state + config.

One orbax step directory per saved optimizer step (``OUTPUT/checkpoints/STEP``) with items ``model`` and
``opt`` (array trees, saved sharded), ``data`` (the Grain iterator state, JSON) and ``meta`` (step, config;
JSON). Restores always go through abstract targets with explicit shardings, so a run saved on 8 devices
restores onto 1 (or another mesh). Saves are asynchronous; an interrupted save never becomes "latest" because
orbax finalises a step directory only when it is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

ITEMS = ("model", "opt", "data", "meta")


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _abstract(state: nnx.State, shardings) -> dict:
    pure = nnx.to_pure_dict(state)
    shard = nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, shard)


class RunCheckpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model_state: nnx.State, opt_state: nnx.State, data_state: Any, meta: dict,
             force: bool = False) -> bool:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(_pure(model_state)),
            opt=ocp.args.StandardSave(_pure(opt_state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, model_state: nnx.State, model_shardings, opt_state: nnx.State, opt_shardings):
        """Restore onto the given (current-mesh) shardings; returns (model pure dict, opt pure dict, data, meta)."""
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(model_state, model_shardings)),
            opt=ocp.args.StandardRestore(_abstract(opt_state, opt_shardings)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        r = self.manager.restore(step, args=args)
        return r.model, r.opt, r.data, r.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
