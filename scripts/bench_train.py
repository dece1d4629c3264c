"""Benchmark the JAX train step against a PyTorch reference, side by side in one run (CPU by default).

Same model (configs/small.yaml weights, exported from JAX), same batch, same trainable set (OSUM's
``link_and_encoder_and_lora``: Whisper encoder + adapter + speech bos/eos + LoRA; base LLM frozen), same
optimizer (AdamW, OSUM's hyper-parameters), dropout off on both sides. The PyTorch reference is
``osum_torch_infer``'s encoder/adapter with ``transformers.Qwen2ForCausalLM`` wrapped by ``peft`` LoRA, eager
mode (what an OSUM-style PyTorch trainer runs). Reports median step time and target tokens/s after warm-up;
JAX compile time is listed separately.

    python scripts/bench_train.py --config configs/small.yaml --batch 4 --frames 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from osum_jax.config_loading import load_config  # noqa: E402
from osum_jax.models import OSUM  # noqa: E402
from osum_jax.train.trainable import trainable_filter  # noqa: E402
from scripts.bench_model import make_batch  # noqa: E402


def jax_side(model, batch, flt, steps):
    opt = nnx.Optimizer(model, optax.adamw(5e-5, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.01), wrt=flt)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    @nnx.jit
    def step(m, o, b):
        loss, g = nnx.value_and_grad(lambda mm: mm(b)["loss"], argnums=nnx.DiffState(0, flt))(m)
        o.update(m, g)
        return loss

    t0 = time.perf_counter()
    jax.block_until_ready(step(model, opt, jb))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = jax.block_until_ready(step(model, opt, jb))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), float(loss)


def torch_side(pkg, cfg, batch, steps, threads):
    from peft import LoraConfig, inject_adapter_in_model

    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    torch.set_num_threads(threads)
    model = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
    lora = cfg.model.lora
    # peft LoRA layers injected in place (the Qwen2ForCausalLM structure the runtime calls stays as it is)
    model.llm = inject_adapter_in_model(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                   target_modules=list(lora.targets)), model.llm)
    model.train()
    for name, p in model.named_parameters():
        trainable = (not name.startswith("llm.") or "lora_" in name) and "embed_positions" not in name
        p.requires_grad_(trainable)  # fixed sinusoid tables are buffers in the JAX model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    tb = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(tb)["loss"]
        loss.backward()
        opt.step()
        return float(loss)

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    n_train = sum(p.numel() for p in params)
    return statistics.median(times), loss, n_train


def matmul_probe(m: int = 828, k: int = 512, n: int = 2752, reps: int = 20, threads: int = 2) -> None:
    """GFLOP/s of one of the step's products (tokens x d_model x intermediate) in every orientation the train step
    uses (forward ``x@W``, input gradient ``dy@Wᵀ``, weight gradient ``xᵀ@dy``), XLA:CPU vs torch, fp32 and bf16."""
    import torch

    torch.set_num_threads(threads)

    def rate(fn, *args):
        fn(*args)
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9

    print(f"# matmul probe {m}x{k}x{n}, GFLOP/s (mean over {reps} calls each, after one warm-up call)")
    for name, jdt, tdt in (("fp32", jnp.float32, torch.float32), ("bf16", jnp.bfloat16, torch.bfloat16)):
        x, w, dy = jnp.ones((m, k), jdt), jnp.ones((k, n), jdt), jnp.ones((m, n), jdt)
        f1, f2, f3 = jax.jit(lambda a, b: a @ b), jax.jit(lambda d, b: d @ b.T), jax.jit(lambda a, d: a.T @ d)
        sync = lambda f: (lambda *a: f(*a).block_until_ready())  # noqa: E731
        tx, tw, tdy = torch.ones((m, k), dtype=tdt), torch.ones((k, n), dtype=tdt), torch.ones((m, n), dtype=tdt)
        print(f"{name}: XLA x@W {rate(sync(f1), x, w):.0f}, dy@Wt {rate(sync(f2), dy, w):.0f}, "
              f"xt@dy {rate(sync(f3), x, dy):.0f} | torch x@W {rate(torch.matmul, tx, tw):.0f}, "
              f"dy@Wt {rate(lambda d, b: d @ b.T, tdy, tw):.0f}, xt@dy {rate(lambda a, d: a.T @ d, tx, tdy):.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--target", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--matmul-probe", action="store_true", help="only time single matmuls of the step's shapes")
    args = ap.parse_args()
    if args.matmul_probe:
        matmul_probe(threads=args.threads)
        return
    cfg = load_config(args.config, ["model.encoder.dropout=0", "model.encoder.positional_dropout=0",
                                    "model.adapter.dropout=0", "model.adapter.positional_dropout=0",
                                    "model.lora.dropout=0"])
    batch = make_batch(cfg.model, args.batch, args.frames, args.prompt, args.target)
    model = OSUM(cfg.model, rngs=nnx.Rngs(0))
    flt = trainable_filter("link_and_encoder_and_lora")
    n_train_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, flt)))
    with tempfile.TemporaryDirectory() as d:
        from osum_jax.convert.torch_package import export_torch_package
        from tests.corpus import train_tokenizer

        tok = train_tokenizer(["transcribe the speech into text"], Path(d) / "tok", vocab_size=300)
        pkg = Path(d) / "pkg"
        export_torch_package(model, cfg.model, pkg, tokenizer_dir=tok, dtype="fp32", progress=False)
        t_time, t_loss, n_train_torch = torch_side(pkg, cfg, batch, args.steps, args.threads)
    compile_s, j_time, j_loss = jax_side(model, batch, flt, args.steps)
    tokens = int(np.sum(batch["target_lengths"]))
    print(f"# {args.config}: batch {args.batch} x {args.frames} frames, prompt {args.prompt}, target "
          f"{args.target}; trainable jax {n_train_jax:,} / torch {n_train_torch:,}; median of {args.steps}")
    print(f"{'side':28} {'step s':>8} {'target tok/s':>12} {'loss':>8}")
    print(f"{'PyTorch (transformers+peft)':28} {t_time:>8.3f} {tokens / t_time:>12.1f} {t_loss:>8.4f}")
    print(f"{'JAX (jit, this project)':28} {j_time:>8.3f} {tokens / j_time:>12.1f} {j_loss:>8.4f}")
    print(f"# JAX speed-up {t_time / j_time:.2f}x; JAX compile {compile_s:.1f} s (excluded)")


if __name__ == "__main__":
    main()
