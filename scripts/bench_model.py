"""Benchmark the Flax OSUM forward pass and train step on the available JAX devices.

Side by side in one run: for each config, eval forward and an AdamW train step with OSUM's trainable set
(Whisper encoder + adapter + speech bos/eos + LoRA; base LLM frozen), per-layer remat off vs full.
Compile time is reported separately; step times are medians over ``--steps`` runs after warm-up.

    python scripts/bench_model.py --configs configs/tiny.yaml configs/small.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from osum_jax.config_loading import load_config
from osum_jax.models import OSUM


def make_batch(cfg, batch: int, frames: int, prompt: int, target: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = cfg.llm.vocab_size
    return dict(
        feats=rng.standard_normal((batch, frames, cfg.encoder.num_mel_bins)).astype(np.float32),
        feats_lengths=np.linspace(frames, frames * 0.6, batch).astype(np.int32),
        prompt=rng.integers(0, v, (batch, prompt)).astype(np.int32),
        prompt_lengths=np.full(batch, prompt, np.int32),
        target=rng.integers(0, v, (batch, target)).astype(np.int32),
        target_lengths=np.linspace(target, target * 0.5, batch).astype(np.int32),
    )


TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.Any(
    nnx.PathContains("encoder"), nnx.PathContains("adapter"), nnx.PathContains("speech_embed"))))


def timed(fn, steps: int):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def bench(path: str, remat: str, args) -> dict:
    cfg = load_config(path, [f"model.remat_policy={remat}", f"model.dtype={args.dtype}"]).model
    model = OSUM(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(5e-5, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.01), wrt=TRAINABLE)
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg, args.batch, args.frames, args.prompt, args.target).items()}

    @nnx.jit
    def forward(m, b):
        return m(b)["loss"]

    @nnx.jit
    def train_step(m, o, b, key):
        loss, grads = nnx.value_and_grad(lambda mm: mm(b, key)["loss"], argnums=nnx.DiffState(0, TRAINABLE))(m)
        o.update(m, grads)
        return loss

    key = jax.random.key(0)
    fwd_compile, fwd = timed(lambda: forward(model, batch), args.steps)
    step_compile, step = timed(lambda: train_step(model, opt, batch, key), args.steps)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
    return dict(config=path, remat=remat, params=n_params, trainable=n_train, forward_s=fwd,
                forward_compile_s=fwd_compile, train_step_s=step, train_step_compile_s=step_compile)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/tiny.yaml", "configs/small.yaml"])
    ap.add_argument("--remat", nargs="+", default=["none", "full"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=1000, help="padded mel frames per utterance (100 per second)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--target", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    print(f"# devices: {jax.devices()} | {platform.processor() or platform.machine()} | jax {jax.__version__}")
    print(f"# batch {args.batch} x {args.frames} frames, prompt {args.prompt}, target {args.target}, "
          f"dtype {args.dtype}, median of {args.steps}")
    rows = []
    header = f"{'config':24} {'remat':6} {'params':>12} {'trainable':>11} {'fwd s':>8} {'step s':>8} " \
             f"{'step/fwd':>8} {'compile s':>9} {'vs none':>7}"
    print(header)
    for path in args.configs:
        base = None
        for remat in args.remat:
            r = bench(path, remat, args)
            base = base or r["train_step_s"]
            r["step_vs_no_remat"] = r["train_step_s"] / base
            rows.append(r)
            print(f"{path:24} {remat:6} {r['params']:>12,} {r['trainable']:>11,} {r['forward_s']:>8.3f} "
                  f"{r['train_step_s']:>8.3f} {r['train_step_s'] / r['forward_s']:>8.2f} "
                  f"{r['train_step_compile_s']:>9.1f} {r['step_vs_no_remat']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
