"""The training loop behind ``osum-train``.

One micro-step = one data batch (static shape from the data buckets) -> forward/backward on the mesh ->
accumulation (``optim.accumulate_skipping_nonfinite``); every ``grad_accum`` micro-steps the optimizer applies an
update, or skips it if the window had a non-finite gradient (an "optimizer step", the unit of ``train.steps``,
logging, evaluation and checkpoints).

Determinism: parameters come from ``train.seed``; the dropout key of micro-step ``m`` is
``fold_in(fold_in(key(seed), 0xD20), m)``; the data order is a pure function of ``data.seed`` and the iterator
state, which is checkpointed with the model. A resumed run therefore repeats an uninterrupted one bit for bit (on CPU).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ..config import Config
from ..models import OSUM
from .agree import AgreedBatches
from ..checkpoint import RunCheckpointer, load_flat, read_config, read_prompts, restore_params
from ..models.flops import train_step_flops
from .mesh import (align_across_processes, build_mesh, data_parallel_size, empty_batch, from_every_process,
                   global_to_host, process_flags, put_batch, put_rows)
from .metrics import MetricsWriter, StepAccumulator, flat_scores
from .optim import learning_rate_schedule
from .step import TrainProgram
from .trainable import count

log = logging.getLogger("osum_jax.train")


class Trainer:
    """Builds the mesh, the sharded model and optimizer, the data pipelines; runs, evaluates, checkpoints."""

    def __init__(self, cfg: Config, *, devices=None, tokenizer=None, prompts=None):
        self.cfg = cfg
        tc = cfg.train
        self.mesh = build_mesh(tc.mesh, devices)
        self.program = TrainProgram(cfg, self.mesh)  # the step osum-train --plan --target compiles, exactly
        self.out_dir = Path(tc.output_dir)
        self.lora_enabled = cfg.model.lora.enabled
        self.filter = self.program.filter
        if tc.init_from:
            trainable, frozen, buffers = self._load_initial_weights(tc.init_from)
        else:
            trainable, frozen, buffers = self.program.init_state()
        # the live module: each step reads its three state groups and writes the trainable one back
        self.model = self.program.merge(trainable, frozen, buffers)
        self.opt_state = self.program.init_opt(trainable)
        self.schedule = learning_rate_schedule(tc)
        self.n_trainable = count(self.model, self.filter)
        self.n_params = count(self.model, nnx.Param)
        if prompts is None and not cfg.data.prompts and tc.init_from:  # OSUM's prompts stored at import-osum
            stored = read_prompts(tc.init_from)
            if stored:
                from ..data.text import PromptBook

                prompts = PromptBook(stored["prompts"], source=f"{tc.init_from} (prompts stored with it, from "
                                                               f"{stored.get('source')})")
                log.info("data.prompts: the prompt book stored with %s", tc.init_from)
        self._tokenizer, self._prompts = tokenizer, prompts
        self.shapes_seen: set[tuple] = set()
        self.checkpointer = None
        self._dev_pipe = None
        self.micro_step = 0
        self.step = 0
        self.data_state = None
        self.nonfinite_steps = 0
        self._stop = False

    # -- set-up ---------------------------------------------------------------------------------------------------

    def state_groups(self) -> tuple[Any, Any, Any]:
        """(trainable, frozen, buffers) of the live model: the step's first, third and fourth arguments."""
        _, t, f, b = nnx.split(self.model, self.filter, nnx.Param, ...)
        return t, f, b

    def _flat_shardings(self) -> dict[str, Any]:
        p = self.program
        out = {}
        for tree in (p.trainable_shardings, p.frozen_shardings, p.buffer_shardings):
            out.update({".".join(map(str, k)): v.get_value() if isinstance(v, nnx.Variable) else v
                        for k, v in nnx.to_flat_state(tree)})
        return out

    def _load_initial_weights(self, path: str):
        """Start from a converter checkpoint (``osum-convert import-*``) or another run's weights.

        Restored straight into the abstract model on this run's mesh: every array is read with the sharding it
        has in the step, so each process reads only its devices' shards, no host materialises the full model and
        no parameter is randomly initialised first."""
        src_cfg = read_config(path)
        mine, theirs = self.cfg.model, src_cfg.model
        for part in ("encoder", "adapter", "llm", "lora", "speech_token_num"):
            if getattr(mine, part) != getattr(theirs, part):
                raise ValueError(f"train.init_from={path}: model.{part} differs from this run's config:\n"
                                 f"  checkpoint: {getattr(theirs, part)}\n  config:     {getattr(mine, part)}")
        flat = restore_params(path, cfg=src_cfg, dtype=mine.param_dtype, shardings=self._flat_shardings())
        parts = self.cfg.train.init_parts
        if not parts:
            model = nnx.eval_shape(lambda: OSUM(mine, rngs=nnx.Rngs(0)))
            load_flat(model, flat, source=f"train.init_from={path}")  # parameters and fixed buffers
            log.info("initialised weights from %s", path)
            return self.program.split(model)
        # some parts only: the run's own initialisation, then those parts' arrays (all of each part) over it
        model = self.program.merge(*self.program.init_state())
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in parts}  # each part whole (restore_params checks)
        load_flat(model, flat, strict=False, source=f"train.init_from={path} (train.init_parts={list(parts)})")
        log.info("initialised %s from %s; the rest from train.seed=%d", ", ".join(parts), path, self.cfg.train.seed)
        return self.program.split(model)

    def data_pipeline(self, train: bool = True):
        from ..data import DataPipeline

        dp = data_parallel_size(self.mesh)
        if dp % jax.process_count():
            raise ValueError(f"data x fsdp = {dp} is not divisible by {jax.process_count()} processes")
        dcfg = dataclasses.replace(self.cfg.data, devices_per_batch=max(1, dp // jax.process_count()))
        pipe = DataPipeline(dcfg, train=train, tokenizer=self._tokenizer, prompts=self._prompts,
                            shard_index=jax.process_index(), shard_count=jax.process_count())
        self._tokenizer, self._prompts = pipe.tokenizer, pipe.prompts
        return pipe

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def open_checkpoints(self) -> None:
        tc = self.cfg.train
        self.checkpointer = RunCheckpointer(self.out_dir / "checkpoints", keep=tc.keep_checkpoints,
                                            async_save=tc.async_checkpoint)

    def _data_layout(self) -> dict[str, int]:
        """What the data order depends on besides the seed: each process reads its own shard, and each worker
        batches its own slice of it."""
        return {"processes": jax.process_count(), "workers": self.cfg.data.num_workers}

    def save(self, force: bool = False) -> None:
        meta = {"step": self.step, "micro_step": self.micro_step, "nonfinite_steps": self.nonfinite_steps,
                "data_layout": self._data_layout()}
        self.checkpointer.save(self.step, nnx.state(self.model), self.opt_state, self.data_state or {}, meta,
                               self.cfg.to_dict(), force=force)

    def restore_latest(self) -> bool:
        step = self.checkpointer.latest_step()
        if step is None:
            return False
        saved_meta = self.checkpointer.restore_meta(step)
        k_then = read_config(self.checkpointer.directory, step).train.grad_accum
        k_now = self.cfg.train.grad_accum
        if (k_then > 1) != (k_now > 1):
            raise ValueError(f"{self.checkpointer.directory}/{step} was written with train.grad_accum={k_then} and "
                             f"this run has train.grad_accum={k_now}: the optimizer state differs in structure (a "
                             f"gradient accumulator exists only for grad_accum > 1); resume with "
                             f"train.grad_accum={k_then}, or with any value on the same side of 1")
        saved = saved_meta.get("data_layout")
        now = self._data_layout()
        same = saved == now
        if not same and self.cfg.train.resume_data:
            raise ValueError(
                f"{self.checkpointer.directory}/{step}: its data-iterator state was written with "
                f"{saved or 'an unrecorded layout (an older osum-jax)'} and this run has {now}; the batch order "
                f"depends on the process count and data.num_workers, so it cannot be resumed exactly. Restart "
                f"with the same ones, or set train.resume_data=false to restore the model and optimizer and "
                f"start the data afresh (each process from the beginning of its shard).")
        meta = saved_meta
        p = self.program
        target = p.merge(p.abstract_trainable, p.abstract_frozen, p.abstract_buffers)
        model, opt, data = self.checkpointer.restore(step, nnx.to_pure_dict(nnx.state(target)), p.abstract_opt,
                                                     data=same and self.cfg.train.resume_data)
        if not (same and self.cfg.train.resume_data):
            log.warning("train.resume_data=false: model and optimizer restored from step %d, data iterator "
                        "started afresh", step)
        mstate = nnx.state(self.model)
        nnx.replace_by_pure_dict(mstate, model)
        nnx.update(self.model, mstate)
        self.opt_state = opt
        self.step, self.micro_step = int(meta["step"]), int(meta["micro_step"])
        self.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        self.data_state = data or None
        log.info("resumed from %s step %d", self.checkpointer.directory, step)
        return True

    # -- one micro-step -------------------------------------------------------------------------------------------

    def micro_batch(self, host_batch: dict) -> dict:
        batch = put_batch(align_across_processes(host_batch), self.mesh)
        shape = tuple(tuple(batch[k].shape) for k in ("feats", "prompt", "target"))
        if shape not in self.shapes_seen:
            self.shapes_seen.add(shape)
            log.info("compiling for batch shape feats %s prompt %s target %s (%d shapes so far)", *shape,
                     len(self.shapes_seen))
        return batch

    def train_micro_step(self, batch: dict) -> dict:
        # a stream of its own (nnx.Rngs(seed) hands out fold_in(key(seed), i) for parameter initialisation)
        key = self.program.dropout_key(self.micro_step)
        trainable, frozen, buffers = self.state_groups()
        with jax.set_mesh(self.mesh):  # trainable and opt_state are donated: replaced by the step's outputs
            trainable, self.opt_state, out = self.program.train_step(trainable, self.opt_state, frozen, buffers,
                                                                     batch, key)
        nnx.update(self.model, trainable)
        self.micro_step += 1
        return out

    # -- evaluation -----------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out loss over ``eval_batches`` dev batches, then greedy decoding of ``eval_decode_batches``.

        Multi-host: each process reads its own share of the dev list; the processes agree on how many batches
        there are (one whose share ran out contributes padding rows), and the decoded tokens, references and
        tasks of all rows are gathered in global order, so every process scores the same whole set."""
        from osum_torch_infer.scoring import score

        from ..data.pipeline import real_rows
        from ..data.text import normalize_task

        tc = self.cfg.train
        if self._dev_pipe is None:  # indexes, tokenizer and prompt checks once per run, not per evaluation
            self._dev_pipe = self.data_pipeline(train=False)
        pipe = self._dev_pipe
        task_table = sorted(pipe.prompts.prompts)
        task_id = {t: i for i, t in enumerate(task_table)}
        it = iter(pipe.dataset())
        losses, tokens = [], []
        refs, hyps, tasks = [], [], []
        for i in range(max(tc.eval_batches, tc.eval_decode_batches)):
            host = next(it, None)
            if not process_flags(host is not None).any():
                break  # every process's share is used up
            if host is None:  # others still have dev batches: take part with padding rows only
                host = empty_batch(self.cfg.data.num_mel_bins)
            batch = self.micro_batch(host)
            trainable, frozen, buffers = self.state_groups()
            with jax.set_mesh(self.mesh):
                if i < tc.eval_batches:
                    out = self.program.eval_step(trainable, frozen, buffers, batch)
                    n = float(out["num_tokens"])
                    losses.append(float(out["loss"]) * n)
                    tokens.append(n)
                if i < tc.eval_decode_batches:
                    dec = {k: v for k, v in batch.items() if not k.startswith("target")}
                    toks, lens = self.program.decode(trainable, frozen, buffers, dec,
                                                     max_new_tokens=tc.eval_max_new_tokens,
                                                     eos_id=pipe.tokenizer.eod_id)
            if i < tc.eval_decode_batches:
                local_tasks = np.full(batch["target"].shape[0] // jax.process_count(), -1, np.int32)  # aligned rows
                for r in np.flatnonzero(real_rows(host)):
                    local_tasks[r] = task_id[normalize_task(str(host["tasks"][r]))]
                g_tasks = global_to_host(put_rows(local_tasks, self.mesh))
                toks, lens = global_to_host(toks), global_to_host(lens)
                target, tlen = global_to_host(batch["target"]), global_to_host(batch["target_lengths"])
                for r in np.flatnonzero(g_tasks >= 0):
                    refs.append(pipe.tokenizer.decode(target[r, : tlen[r] - 1]))
                    hyps.append(pipe.tokenizer.decode(toks[r, : lens[r]]))
                    tasks.append(task_table[g_tasks[r]])
        metrics = {"eval/loss": sum(losses) / max(sum(tokens), 1.0), "eval/decoded_utterances": float(len(refs))}
        if refs:
            keys = [str(i) for i in range(len(refs))]
            report = score(dict(zip(keys, refs)), dict(zip(keys, hyps)), dict(zip(keys, tasks)))
            metrics.update(flat_scores(report))
        self.last_eval_examples = list(zip(refs, hyps))[:5]
        return metrics

    # -- the loop -------------------------------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the next optimizer step, then exiting")
        self._stop = True

    def train(self) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        pipe = self.data_pipeline(train=True)  # first: data.strict refusing a line leaves no run folder behind
        self.open_checkpoints()
        self.restore_latest()
        # multi-host: one bucket per step on every process (held-back batches are part of the data state)
        it = AgreedBatches(iter(pipe.dataset()), spec=pipe.spec, refetch=pipe.processor,
                           mel_bins=cfg.data.num_mel_bins, gather=from_every_process,
                           process_count=jax.process_count())
        if self.data_state:
            it.set_state(self.data_state)
        writer = MetricsWriter(self.out_dir)
        if jax.process_index() == 0:
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _in_main_thread() else None
        bar = None
        if tc.progress and jax.process_index() == 0:
            from osum_torch_infer.progress import progress_bar

            bar = progress_bar(total=tc.steps, initial=self.step, desc="train", unit="step")
        acc = StepAccumulator()
        recent = collections.deque(maxlen=tc.stop_window)  # train.stop_below_loss: the last steps' losses
        early = False
        summary: dict[str, Any] = {}
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                host = it.next_batch()
                have = process_flags(host is not None)[:, 0]  # all processes stop together
                if not have.all():
                    log.info("data exhausted after %d optimizer steps (process(es) %s)", self.step,
                             np.flatnonzero(~have).tolist())
                    if self.step and self.checkpointer.latest_step() != self.step:
                        self.save()  # keep the steps since the last checkpoint
                    break
                batch = self.micro_batch(host)
                out = self.train_micro_step(batch)
                f = train_step_flops(cfg.model, batch["feats"].shape[0], batch["feats"].shape[1],
                                     batch["prompt"].shape[1], batch["target"].shape[1], trainable=tc.fire_module)
                acc.add(out, host, t0, f)
                if self.micro_step % tc.grad_accum:
                    continue
                self.step += 1
                self.data_state = it.get_state()
                self._stop = bool(process_flags(self._stop).any())  # a SIGTERM on any process stops all at this step
                # the schedule counts applied updates: skipped windows do not advance it
                metrics = acc.flush(self, self.schedule(self.step - 1 - self.nonfinite_steps))
                self.nonfinite_steps += metrics["nonfinite"]
                metrics["nonfinite_steps"] = self.nonfinite_steps
                summary = metrics
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
                if tc.stop_below_loss:  # the loss is the global batch's, so every process decides alike
                    recent.append(metrics["loss"])
                    early = len(recent) == tc.stop_window and sum(recent) / len(recent) < tc.stop_below_loss
                    if early:
                        log.info("step %d: mean train loss of the last %d steps %.4f < train.stop_below_loss=%g; "
                                 "stopping", self.step, tc.stop_window, sum(recent) / len(recent), tc.stop_below_loss)
                        summary["stopped_early_at"] = self.step
                if self.step % tc.log_every == 0 or self.step == 1 or self.step == tc.steps or early:
                    writer.write(self.step, metrics)
                if tc.eval_every and self.step % tc.eval_every == 0:
                    ev = self.evaluate()
                    writer.write(self.step, ev)
                    summary.update(ev)
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or self._stop or early:
                    self.save()
                if self._stop or early:
                    break
        finally:
            if bar is not None:
                bar.close()
            if self.checkpointer is not None:
                self.checkpointer.close()
            writer.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        summary["compiled_shapes"] = len(self.shapes_seen)
        summary["batch_shapes"] = sorted(self.shapes_seen)
        summary["padding_steps"] = it.padding_steps
        summary["skipped_samples"] = _skip_counts(self.data_state)
        return summary


def _skip_counts(state) -> dict[str, int]:
    from ..data.pipeline import skip_counts

    return skip_counts(state) if state else {}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
