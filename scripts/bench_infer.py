"""Decode speed of the torch runtime (``osum_torch_infer``) vs the OSUM-style path, side by side in one run.

* **this package**: merged LoRA, batched generation (left-padded prefix embeddings), batch 1 and batch 8.
* **OSUM-style**: what OSUM's ``generate`` does: ``transformers`` Qwen2 wrapped by ``peft`` with the LoRA
  adapters *unmerged*, ``generate(inputs_embeds=...)`` one utterance at a time (batch 1). Same encoder, same
  greedy decoding, same number of new tokens, so only the LLM path differs.

A random model of ``--config`` (default ``configs/small.yaml``, random non-zero LoRA B) is built in JAX and
exported with ``osum_jax.convert.torch_package`` (merged and ``--no-merge-lora`` packages). Every run decodes
exactly ``--new-tokens`` tokens (``min_new_tokens``), after one warm-up. Reports decode tokens/s and latency
(seconds per ``generate`` call, including the audio tower and the prefill).

    python scripts/bench_infer.py [--config configs/small.yaml] [--new-tokens 32] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["transcribe the speech into text", "the quick brown fox jumps over the lazy dog"],
                            trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def build_packages(config: str, root: Path) -> tuple[Path, Path]:
    from flax import nnx

    from osum_jax.config import load_config
    from osum_jax.convert.torch_package import export_torch_package
    from osum_jax.models import OSUM

    cfg = load_config(config).model
    model = OSUM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":
            var.set_value(0.02 * rng.standard_normal(var.shape).astype(np.float32))
    tok = _tokenizer(root / "tok")
    merged, unmerged = root / "merged", root / "unmerged"
    export_torch_package(model, cfg, merged, tokenizer_dir=tok, dtype="fp32", progress=False)
    export_torch_package(model, cfg, unmerged, tokenizer_dir=tok, dtype="fp32", merge_lora=False, progress=False)
    return merged, unmerged


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        merged, unmerged = build_packages(args.config, Path(tmp))
        build_s = time.perf_counter() - t0
        model = OSUMForConditionalGeneration.from_pretrained(merged, device=args.device, dtype="fp32")
        dev = model.device
        # OSUM-style LLM: HF Qwen2 + peft, adapters unmerged
        cfg = json.loads((unmerged / "config.json").read_text())
        qcfg = Qwen2Config(**{k: v for k, v in cfg["llm"].items()
                              if k not in ("architectures", "model_type", "torch_dtype")})
        base = Qwen2ForCausalLM(qcfg)
        with safe_open(str(unmerged / "model.safetensors"), "pt") as f:
            state = {k[4:]: f.get_tensor(k) for k in f.keys() if k.startswith("llm.")}
        base.load_state_dict(state, strict=False)
        osum_llm = PeftModel.from_pretrained(base, str(unmerged)).to(dev).eval()

        rng = np.random.default_rng(0)
        n_mels = model.config.encoder.num_mel_bins
        lengths = rng.integers(500, 1001, 8)  # 5-10 s of audio
        feats = rng.standard_normal((8, int(lengths.max()), n_mels)).astype(np.float32)
        prompt = model.encode_text("transcribe the speech into text")
        n = args.new_tokens
        gc = model.generation_config("greedy", max_new_tokens=n, min_new_tokens=n)

        def ours(b):
            out = model.generate(feats[:b, :int(lengths[:b].max())], lengths[:b], [prompt] * b, generation_config=gc)
            assert all(len(r) == n for r in out), [len(r) for r in out]

        @torch.inference_mode()
        def osum_style():
            f = torch.from_numpy(feats[:1, :int(lengths[0])]).to(dev)
            speech, slen = model.encode_speech(f, torch.from_numpy(lengths[:1]).to(dev))
            k = model.config.speech_token_num
            emb = osum_llm.get_input_embeddings()(torch.tensor([prompt], device=dev))
            x = torch.cat([emb, model.speech_embed.weight[k:k + 1][None], speech,
                           model.speech_embed.weight[k + 1:k + 2][None]], dim=1)
            out = osum_llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                                device=dev), generation_config=gc)
            assert out.shape[1] == n

        # the two LLM paths compute the same function: same first tokens (greedy)
        x, mask = model.build_prefix(feats[:1, :int(lengths[0])], lengths[:1], [prompt])
        with torch.inference_mode():
            a = model.llm(inputs_embeds=x, attention_mask=mask).logits
            b = osum_llm(inputs_embeds=x, attention_mask=mask).logits
        max_diff = float((a - b).abs().max() / a.abs().max())

        t1 = _time(lambda: ours(1), args.repeats)
        t8 = _time(lambda: ours(8), args.repeats)
        to = _time(osum_style, args.repeats)
    rows = {
        "osum-style (peft unmerged, batch 1)": {"batch": 1, "latency_s": to, "tokens_per_s": n / to},
        "osum_torch_infer batch 1": {"batch": 1, "latency_s": t1, "tokens_per_s": n / t1},
        "osum_torch_infer batch 8": {"batch": 8, "latency_s": t8, "tokens_per_s": 8 * n / t8},
    }
    info = {"config": args.config, "device": str(dev), "threads": torch.get_num_threads(), "new_tokens": n,
            "audio_frames": lengths.tolist(), "repeats": args.repeats, "build_and_export_s": round(build_s, 1),
            "merged_vs_peft_max_rel_logit_diff": max_diff, "results": rows,
            "speedup_batch1": to / t1, "throughput_gain_batch8": (8 * n / t8) / (n / to)}
    print(f"config {args.config}, device {dev}, {torch.get_num_threads()} threads, {n} new tokens per utterance, "
          f"median of {args.repeats}")
    print("| path | batch | latency (s / generate call) | decode tokens/s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['batch']} | {r['latency_s']:.3f} | {r['tokens_per_s']:.1f} |")
    print(f"speed-up at batch 1: {info['speedup_batch1']:.2f}x; throughput at batch 8 vs OSUM-style batch 1: "
          f"{info['throughput_gain_batch8']:.2f}x; merged vs peft logits max rel diff {max_diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
