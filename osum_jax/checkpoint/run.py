"""Writing a training run's checkpoints: the model checkpoint of :mod:`osum_jax.checkpoint.layout` plus the state
to resume from.

One orbax step directory per saved optimizer step (``OUTPUT/checkpoints/STEP``) with the model checkpoint's items
``params`` (the weights, saved sharded) and ``config``, plus ``opt`` (the optax state, saved sharded), ``data``
(the Grain iterator state of every process, one ``process_I-of-N.json`` each, written by Grain's orbax handler)
and ``meta`` (step counters and the process and worker counts the data state belongs to; JSON). Every reader of
:mod:`~osum_jax.checkpoint.layout` (``osum-convert export-*``, ``train.init_from``, ``load_model``) takes a run. Restores always go through abstract targets with explicit shardings, so a run saved on 8 devices
restores onto 1 (or another mesh). Saves are asynchronous; an interrupted save never becomes "latest" because
orbax finalises a step directory only when it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from flax import nnx

from .layout import _LEGACY_WEIGHTS, MODEL_ITEMS, WEIGHTS, weights_item

RUN_ITEMS = MODEL_ITEMS + ("opt", "data", "meta")


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


class DataState:
    """A Grain iterator state captured at an optimizer-step boundary (``it.get_state()``), in the form Grain's
    orbax handler (``grain.checkpoint.CheckpointHandler``) saves and restores: JSON bytes, one file per process,
    so every process of a multi-host run gets its own position back (orbax's JSON items are written by the
    primary process only)."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state if self.state is not None else {}).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by the handler after set_state; nothing runs ahead here
        pass


def data_state_file(step_dir: Path) -> Path:
    """This process's file in the ``data`` item of a step directory."""
    return Path(step_dir) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class RunCheckpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=RUN_ITEMS + (_LEGACY_WEIGHTS,))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model_state: nnx.State, opt_state: Any, data_state: Any, meta: dict,
             config: dict, force: bool = False) -> bool:
        """``opt_state``: the optax state pytree as the train step returns it (saved as it is); ``config``:
        ``Config.to_dict()``."""
        args = ocp.args.Composite(**{
            WEIGHTS: ocp.args.StandardSave(_pure(model_state)),
            "config": ocp.args.JsonSave(config),
            "opt": ocp.args.StandardSave(opt_state),
            "data": grain.checkpoint.CheckpointSave(DataState(data_state)),
            "meta": ocp.args.JsonSave(meta),
        })
        return self.manager.save(step, args=args, force=force)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, model_target: dict, opt_target: Any, *, data: bool = True):
        """Restore onto abstract targets (``ShapeDtypeStruct`` leaves carrying the current mesh's shardings and
        the dtypes wanted): ``model_target`` a pure dict of the model state, ``opt_target`` the optax state tree.
        Returns (model pure dict, optax state, data state or None); the ``meta`` item is read by
        :meth:`restore_meta`. ``data=False`` leaves the iterator state on disk (it belongs to another process
        layout)."""
        weights = weights_item(self.directory, step)
        args = {weights: ocp.args.StandardRestore(model_target), "opt": ocp.args.StandardRestore(opt_target)}
        if data:
            f = data_state_file(self.directory / str(step))
            if not f.is_file():
                have = sorted(p.name for p in f.parent.glob("*.json")) if f.parent.is_dir() else []
                raise FileNotFoundError(f"{f.parent}: no data-iterator state for process {jax.process_index()} of "
                                        f"{jax.process_count()} (the step holds {have or 'none'})")
            args["data"] = grain.checkpoint.CheckpointRestore(DataState())
        r = self.manager.restore(step, args=ocp.args.Composite(**args))
        return r[weights], r["opt"], (r["data"].state if data else None)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
