"""Smoke test of the torch runtime on one accelerator, no weights needed (≤ 5 minutes on one GPU).

    python scripts/gpu_smoke.py --device cuda            # everything, including a full-size decode
    python scripts/gpu_smoke.py --device cpu --quick     # what CI runs: the small package only

It builds a random package of the documented format (osum_torch_infer.package schema, safetensors, a tiny BPE
tokenizer, prompts) with torch alone, then checks in order: the environment and bf16 support; whether each SDPA
backend returns NaN for a fully masked query row (a fact about the kernels, reported, not a failure: the runtime's
masks never leave such a row); a bf16 load with every tensor on the device; teacher-forced logits on the device vs
CPU float32 (fp32 ≤ 1e-3, bf16 ≤ 5e-2 relative, finite); greedy tokens batched = one by one, device = CPU, for both
engines and both caches; the beam and OSUM presets run; and (not --quick) a Qwen2-7B / Whisper-medium-shaped model
with random bf16 weights made on the device: decode tokens/s at batch 8 and peak memory. One JSON line per check
on stdout; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FAILED = []


def report(check: str, ok: bool, **info) -> None:
    print(json.dumps({"check": check, "ok": bool(ok), **info}, default=str), flush=True)
    if not ok:
        FAILED.append(check)


def _qwen2(vocab, hidden, inter, layers, heads, kv, dtype):
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
            "torch_dtype": dtype}


def small_config(vocab: int):
    from osum_torch_infer.modeling import AdapterConfig, EncoderConfig, OSUMConfig

    return OSUMConfig(encoder=EncoderConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128),
                      adapter=AdapterConfig(num_layers=1, num_heads=4, ffn_dim=128, max_positions=512),
                      llm=_qwen2(vocab, 64, 128, 2, 4, 2, "bfloat16"), speech_token_num=8, eos_token_id=0,
                      torch_dtype="bfloat16", lora={"merged": True, "rank": 0},
                      audio={"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "num_mel_bins": 80,
                             "max_frames": 3000})


def full_config():
    from osum_torch_infer.modeling import AdapterConfig, EncoderConfig, OSUMConfig

    return OSUMConfig(encoder=EncoderConfig(), adapter=AdapterConfig(),
                      llm=_qwen2(152064, 3584, 18944, 28, 28, 4, "bfloat16"), eos_token_id=151643)


def build_package(root: Path) -> Path:
    """A random package in the documented format, written with torch and tokenizers only."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["transcribe the speech please", "what is the speaker's gender and age"] * 8, trainer)
    pkg = root / "pkg"
    pkg.mkdir()
    tok.save(str(pkg / "tokenizer.json"))
    cfg = small_config(512)
    torch.manual_seed(0)
    model = OSUMForConditionalGeneration(cfg)
    model.to(torch.bfloat16).save_pretrained(pkg)  # transformers' layout is the package layout
    (pkg / "prompts.yaml").write_text('"<TRANSCRIBE>": ["transcribe the speech please"]\n', encoding="utf-8")
    (pkg / "generation_config.json").write_text(json.dumps({"max_new_tokens": 16, "num_beams": 4, "do_sample": True,
                                                            "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.05}))
    return pkg


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.array([300, 170, 61])
    feats = rng.standard_normal((3, 300, 80)).astype(np.float32)
    prompts = [[5, 6, 7, 8], [9, 10], []]
    return feats, lengths, prompts


def check_sdpa_backends(dev: torch.device) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 3, 16, device=dev)
    k, v = torch.randn(1, 2, 3, 16, device=dev), torch.randn(1, 2, 3, 16, device=dev)
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]], device=dev)[None, None]
    backends = [SDPBackend.MATH]
    if dev.type == "cuda":
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for b in backends:
        for dt in ((torch.float32, torch.bfloat16) if dev.type != "cpu" else (torch.float32,)):
            try:
                with sdpa_kernel(b):
                    out = torch.nn.functional.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), attn_mask=mask)
                report("sdpa_fully_masked_row", True, backend=b.name, dtype=str(dt), nan=bool(out[0, :, 0].isnan().any()))
            except RuntimeError as e:  # the backend does not take this input (e.g. flash with a mask)
                report("sdpa_fully_masked_row", True, backend=b.name, dtype=str(dt), unavailable=str(e)[:120])


def check_package(pkg: Path, dev: torch.device) -> None:
    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    accel = dev.type != "cpu"
    cpu32 = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
    bf = OSUMForConditionalGeneration.from_pretrained(pkg, device=str(dev), dtype="bf16")
    where = {str(t.device) for t in list(bf.parameters()) + list(bf.buffers())}
    report("bf16_load_on_device", where == {str(bf.device)} and bf.dtype == torch.bfloat16, devices=sorted(where),
           reason=bf.device_reason)
    dev32 = OSUMForConditionalGeneration.from_pretrained(pkg, device=str(dev), dtype="fp32") if accel else cpu32
    rng = np.random.default_rng(1)
    batch = dict(feats=rng.standard_normal((2, 200, 80)).astype(np.float32), feats_lengths=np.array([200, 90]),
                 prompt=np.array([[5, 6, 7], [8, -1, -1]]), prompt_lengths=np.array([3, 1]),
                 target=np.array([[10, 11, 12, 13], [14, 15, -100, -100]]), target_lengths=np.array([4, 2]))
    with torch.no_grad():
        ref = cpu32(batch)["logits"].float()
        for name, m, tol in (("fp32", dev32, 1e-3), ("bf16", bf, 5e-2)):
            got = m(batch)["logits"].float().cpu()
            err = max(float((got[b, :n] - ref[b, :n]).abs().max() / ref[b, :n].abs().max())
                      for b, n in enumerate(batch["target_lengths"]))
            report("teacher_forced_logits", bool(torch.isfinite(got).all()) and err <= tol, dtype=name,
                   max_rel_err=err, tolerance=tol)
    feats, lengths, prompts = _inputs()
    ref_tokens = None
    for engine in ("fast", "hf"):
        for cache in (None, "static"):
            single = [dev32.generate(feats[i:i + 1, :lengths[i]], lengths[i:i + 1], [prompts[i]], max_new_tokens=8,
                                     engine=engine, cache_implementation=cache)[0] for i in range(3)]
            batched = dev32.generate(feats, lengths, prompts, max_new_tokens=8, engine=engine,
                                     cache_implementation=cache)
            cpu = cpu32.generate(feats, lengths, prompts, max_new_tokens=8, engine=engine, cache_implementation=cache)
            same = [list(map(int, t)) for t in batched] == [list(map(int, t)) for t in single] == \
                [list(map(int, t)) for t in cpu]
            ref_tokens = ref_tokens or [list(map(int, t)) for t in cpu]
            report("greedy_batched_single_cpu", same, engine=engine, cache=cache or "dynamic",
                   tokens=[len(t) for t in batched])
    for decoding in ("beam", "osum"):
        try:
            out = bf.generate(feats, lengths, prompts, decoding=decoding, max_new_tokens=6)
            report("preset_runs", len(out) == 3, decoding=decoding)
        except Exception as e:  # a failure here is the finding
            report("preset_runs", False, decoding=decoding, error=f"{type(e).__name__}: {e}"[:300])


def check_full_size(dev: torch.device) -> None:
    """Qwen2-7B / Whisper-medium shapes, random bf16 weights made on the device: decode speed and memory."""
    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    cfg = full_config()
    with torch.device("meta"):
        model = OSUMForConditionalGeneration(cfg)
    model = model.to_empty(device=dev).to(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        with torch.device(dev):
            model.llm.model.rotary_emb = type(model.llm.model.rotary_emb)(config=model.config.text_config)
    model.eval()
    feats = np.random.default_rng(0).standard_normal((8, 3000, 80)).astype(np.float32)
    lengths = np.full(8, 3000)
    prompts = [[1, 2, 3, 4]] * 8
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.generate(feats, lengths, prompts, max_new_tokens=4, min_new_tokens=4)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    new = 64
    out = model.generate(feats, lengths, prompts, max_new_tokens=new, min_new_tokens=new)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
    report("full_size_decode", all(len(t) == new for t in out), batch=8, new_tokens=new, seconds=dt,
           tokens_per_s=8 * new / dt, peak_memory_gib=peak)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda[:N] | npu[:N] | cpu")
    ap.add_argument("--quick", action="store_true", help="skip the full-size model (CPU CI)")
    args = ap.parse_args(argv)
    from osum_torch_infer.devices import select_device

    try:
        dev, why = select_device(args.device)
    except (RuntimeError, ValueError) as e:
        report("environment", False, error=str(e))
        return 1
    bf16 = dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_bf16_supported())
    report("environment", True, torch=torch.__version__, device=str(dev), reason=why, bf16=bf16,
           name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None)
    check_sdpa_backends(dev)
    with tempfile.TemporaryDirectory() as d:
        check_package(build_package(Path(d)), dev)
    if not args.quick:
        check_full_size(dev)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
