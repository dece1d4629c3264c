"""orbax checkpoints of a training run: model + optimizer state + step + data-iterator state + config.

One orbax step directory per saved optimizer step (``OUTPUT/checkpoints/STEP``) with items ``model`` and
``opt`` (array trees, saved sharded), ``data`` (the Grain iterator state of every process, one
``process_I-of-N.json`` each, written by Grain's orbax handler) and ``meta`` (step, config, and the process and
worker counts the data state belongs to; JSON). Restores always go through abstract targets with explicit shardings, so a run saved on 8 devices
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

ITEMS = ("model", "opt", "data", "meta")


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model_state: nnx.State, opt_state: Any, data_state: Any, meta: dict,
             force: bool = False) -> bool:
        """``opt_state``: the optax state pytree as the train step returns it (saved as it is)."""
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(_pure(model_state)),
            opt=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(DataState(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, model_target: dict, opt_target: Any, *, data: bool = True):
        """Restore onto abstract targets (``ShapeDtypeStruct`` leaves carrying the current mesh's shardings and
        the dtypes wanted): ``model_target`` a pure dict of the model state, ``opt_target`` the optax state tree.
        Returns (model pure dict, optax state, data state or None); the ``meta`` item is read by
        :meth:`restore_meta`. ``data=False`` leaves the iterator state on disk (it belongs to another process
        layout)."""
        args = dict(model=ocp.args.StandardRestore(model_target), opt=ocp.args.StandardRestore(opt_target))
        if data:
            f = data_state_file(self.directory / str(step))
            if not f.is_file():
                have = sorted(p.name for p in f.parent.glob("*.json")) if f.parent.is_dir() else []
                raise FileNotFoundError(f"{f.parent}: no data-iterator state for process {jax.process_index()} of "
                                        f"{jax.process_count()} (the step holds {have or 'none'})")
            args["data"] = grain.checkpoint.CheckpointRestore(DataState())
        r = self.manager.restore(step, args=ocp.args.Composite(**args))
        return r.model, r.opt, (r.data.state if data else None)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def is_run_directory(path: str | Path) -> bool:
    """True for an ``osum-train`` output directory (or its ``checkpoints`` folder)."""
    p = Path(path)
    return (p / "checkpoints").is_dir() or (p.name == "checkpoints" and p.is_dir())


def run_checkpoints_dir(path: str | Path) -> Path:
    """The ``checkpoints`` folder of an ``osum-train`` run (``path`` may be the run or that folder)."""
    p = Path(path)
    return p if p.name == "checkpoints" else p / "checkpoints"


def _run_manager(path: str | Path) -> tuple[Path, ocp.CheckpointManager]:
    ckpt_dir = run_checkpoints_dir(path)
    return ckpt_dir, ocp.CheckpointManager(ckpt_dir.absolute(), item_names=ITEMS)


def _run_step_config(ckpt_dir: Path, mgr: ocp.CheckpointManager, step: int | None, overrides):
    from ..config import config_from_dict

    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, config_from_dict(meta["config"], overrides, source=f"{ckpt_dir}/{step}/meta")


def read_run_config(path: str | Path, step: int | None = None, overrides=()):
    """The :class:`~osum_jax.config.Config` stored with an ``osum-train`` run's checkpoint (latest by default)."""
    ckpt_dir, mgr = _run_manager(path)
    with mgr:
        return _run_step_config(ckpt_dir, mgr, step, overrides)[1]


def load_run_model(path: str | Path, step: int | None = None, overrides=(), *, shardings=None):
    """``(OSUM model, Config, step)`` from an ``osum-train`` run, restored on one CPU device (any topology), or
    with ``shardings`` (``{dotted path: Sharding}``, e.g. a training mesh's) where given.

    Only the ``model`` and ``meta`` items are read; the optimizer state is left on disk.
    """
    from ..models import OSUM

    ckpt_dir, mgr = _run_manager(path)
    with mgr:
        step, cfg = _run_step_config(ckpt_dir, mgr, step, overrides)
        model = nnx.eval_shape(lambda: OSUM(cfg.model, rngs=nnx.Rngs(0)))
        state = nnx.state(model)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        shardings = shardings or {}
        target = jax.tree_util.tree_map_with_path(
            lambda kp, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings.get(
                ".".join(str(getattr(k, "key", k)) for k in kp), cpu)), nnx.to_pure_dict(state))
        restored = mgr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))).model
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model, cfg, step
