"""Decode speed of the torch runtime (``osum_torch_infer``) vs the OSUM-style path, side by side in one run.

* **this package**: merged LoRA, batched generation (left-padded prefix embeddings), batch 1 and batch 8.
* **OSUM-style**: what OSUM's ``generate`` does: ``transformers`` Qwen2 wrapped by ``peft`` with the LoRA
  adapters *unmerged*, ``generate(inputs_embeds=...)`` one utterance at a time (batch 1). Same encoder, same
  greedy decoding, same number of new tokens, so only the LLM path differs.

A random model of ``--config`` (default ``configs/small.yaml``, random non-zero LoRA B) is built in JAX and
exported with ``osum_jax.convert.torch_package`` (merged and ``--no-merge-lora`` packages). Every run decodes
exactly ``--new-tokens`` tokens (``min_new_tokens``), after one warm-up. Reports decode tokens/s and latency
(seconds per ``generate`` call, including the audio tower and the prefill), each path timed in alternation
(round-robin over the paths, ``--repeats`` rounds, median per path) so that load from other processes hits all
paths alike. The tokens of every path are checked to be identical (utterance 0 of every path equals the
OSUM-style tokens; batch 8 equals one-by-one). Also reports where the time goes: audio tower, prefill and the
per-token decode step of each path.

``osum_torch_infer`` runs with ``engine="auto"`` (its lean greedy loop; ``--engine hf`` for transformers'
``generate``) and ``--cache dynamic|static`` (the KV cache of both).

    python scripts/bench_infer.py [--config configs/small.yaml] [--new-tokens 32] [--repeats 5] [--device cpu]
                                  [--engine auto|hf] [--cache dynamic|static] [--threads N] [--compile-probe]

**Long audio, VAD vs fixed windows** (``--long-audio PKG --corpus DIR``): one recording of at least ``--minutes``
made from the corpus's test utterances (``test.list``; the spoken text is each entry's ``extra.text``, else its
``txt``) in a random order with pauses of 0.3 .. 1.0 s between them, decoded whole by ``osum-infer`` (greedy) with
``--segment vad`` and with ``--segment fixed`` at each ``--max-seconds``; the WER of each transcript against the
utterances' texts in order, and how many of the fixed windows' cuts fall inside an utterance's speech (a word cut
in two). Pauses are shortened where needed so that a word crosses every ``--marks`` seconds (default 30)::

    python scripts/bench_infer.py --long-audio PKG --corpus CORPUS [--minutes 5] [--max-seconds 30 2.56]
                                  [--marks 30] [--seed 0]
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

    from osum_jax.config_loading import load_config
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


def _time_round_robin(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function; one warm-up each, then ``repeats`` rounds over all of them."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compile_probe(model, feats, lengths, prompt, n: int, repeats: int = 5) -> dict:
    """Per-token time of the static-cache decode step (``Qwen2ForCausalLM`` forward, one token, fixed shapes:
    the full-length mask and explicit cache positions) eager vs ``torch.compile``d (transformers'
    ``get_compiled_call``, inductor, ``fullgraph=True``, mode ``default``: no CUDA graphs on CPU)."""
    import torch
    from transformers import StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    llm = model.llm
    x, _ = model.build_prefix(feats, lengths, [prompt])
    s = x.shape[1]
    compiled = llm.get_compiled_call(CompileConfig(mode="default", fullgraph=True))

    @torch.inference_mode()
    def decode(fn):
        cache = StaticCache(config=llm.config, max_cache_len=s + n)
        full = torch.ones(1, s + n, dtype=torch.long, device=x.device)
        out = llm(inputs_embeds=x, attention_mask=full[:, :s], past_key_values=cache, use_cache=True,
                  logits_to_keep=1, cache_position=torch.arange(s, device=x.device))
        nxt, toks = out.logits[:, -1].argmax(-1), []
        t0 = time.perf_counter()
        for t in range(n - 1):
            cp = torch.tensor([s + t], device=x.device)
            o = fn(input_ids=nxt[:, None], position_ids=cp[None], cache_position=cp, past_key_values=cache,
                   attention_mask=full, use_cache=True, logits_to_keep=1)
            nxt = o.logits[:, -1].argmax(-1)
            toks.append(int(nxt))
        return (time.perf_counter() - t0) / (n - 1), toks

    t0 = time.perf_counter()
    _, toks_c = decode(compiled)
    compile_s = time.perf_counter() - t0
    _, toks_e = decode(llm.__call__)
    eager, comp = [], []
    for _ in range(repeats):
        eager.append(decode(llm.__call__)[0])
        comp.append(decode(compiled)[0])
    return {"eager_s_per_token": statistics.median(eager), "compiled_s_per_token": statistics.median(comp),
            "compile_pass_s": compile_s, "same_tokens": toks_c == toks_e}


def long_recording(corpus: Path, minutes: float, seed: int, marks: float = 30.0):
    """``(wave, texts, speech)``: the corpus's test utterances (``test.list``) in a random order, 0.3 .. 1.0 s of
    silence between them, until the recording is at least ``minutes`` long; ``speech`` holds each utterance's first
    and last audible sample (|x| > 1e-3). Every multiple of ``marks`` seconds falls 0.25 s into an utterance's
    speech (a pause before it shortened, or one before the utterance before it lengthened), and the recording's
    length is a multiple of ``marks``, so that windows of ``marks`` seconds cut words there."""
    from osum_torch_infer.features import load_audio

    entries = [json.loads(line) for line in (corpus / "test.list").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    order = [int(i) for _ in range(int(minutes * 60 / 2) // len(entries) + 2) for i in rng.permutation(len(entries))]
    clips = {}
    sr, step = 16000, int(marks * 16000)
    parts, texts, speech, pos = [], [], [], 0
    for n, i in enumerate(order):
        e = entries[i]
        if i not in clips:
            x = load_audio(str(corpus / e["wav"]))
            loud = np.flatnonzero(np.abs(x) > 1e-3)
            clips[i] = (x, int(loud[0]), int(loud[-1]))
        x, first, last = clips[i]
        mark = (pos // step + 1) * step
        if n and pos + last <= mark < pos + len(x) + int(0.45 * sr):  # after this speech, too close for the gap
            delta = mark - (pos + last) + int(0.25 * sr)  # to fix: a longer pause before it moves it past the mark
            parts.append(np.zeros(delta, np.float32))
            pos += delta
        speech.append((pos + first, pos + last))
        texts.append((e.get("extra") or {}).get("text") or e["txt"])
        parts.append(x)
        pos += len(x)
        if pos >= minutes * 60 * sr:
            break
        gap = int(rng.uniform(0.3, 1.0) * sr)
        nxt = clips[order[n + 1]][1] if order[n + 1] in clips else 0
        mark = (pos // step + 1) * step  # the next multiple of ``marks``
        if speech[-1][1] < mark <= pos + gap + nxt:  # the mark would fall in this pause: move it into the speech
            want = mark - pos - nxt - int(0.25 * sr)
            if want >= int(0.1 * sr):
                gap = want
        parts.append(np.zeros(gap, np.float32))
        pos += gap
    end = -(-pos // step) * step
    parts.append(np.zeros(end - pos, np.float32))
    return np.concatenate(parts), texts, speech


def long_audio(args) -> int:
    """VAD vs fixed windows on one long recording (see the module docstring)."""
    import soundfile as sf

    from osum_torch_infer import cli
    from osum_torch_infer.scoring import wer
    from osum_torch_infer.segment import segment_audio

    wave, texts, speech = long_recording(Path(args.corpus), args.minutes, args.seed, args.marks)
    ref = " ".join(texts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "long.wav"
        sf.write(wav, wave, 16000, subtype="PCM_16")
        for max_s in args.max_seconds:
            cuts = [int(round(s.end * 16000)) for s in segment_audio(wave, 16000, mode="fixed", max_seconds=max_s)]
            in_speech = sum(any(a < c < b for a, b in speech) for c in cuts[:-1])
            for mode in ("vad", "fixed"):
                out = Path(tmp) / f"{mode}_{max_s:g}.jsonl"
                t0 = time.perf_counter()
                rc = cli.main(["--model", args.long_audio, "--wav", str(wav), "--out", str(out), "--task",
                               "<TRANSCRIBE>", "--device", args.device, "--dtype", "fp32", "--segment", mode,
                               "--max-seconds", f"{max_s:g}", "--batch-size", "16", "--no-progress",
                               "--overwrite"])
                seconds = time.perf_counter() - t0
                if rc != 0:
                    raise SystemExit(f"osum-infer failed ({rc}) for --segment {mode} --max-seconds {max_s:g}")
                r = json.loads(out.read_text())
                w = wer([ref], [r["transcript"]])
                rows.append({"max_seconds": max_s, "segment": mode, "segments": len(r["segments"]),
                             "cuts_inside_utterances": in_speech if mode == "fixed" else None,
                             "wer": w["rate"], "errors": w["errors"], "ref_words": w["ref_tokens"],
                             **{k: w[k] for k in ("substitutions", "deletions", "insertions")},
                             "seconds": round(seconds, 1)})
                print(f"--max-seconds {max_s:g} --segment {mode}: WER {100 * w['rate']:.1f} % ({w['errors']} / "
                      f"{w['ref_tokens']}), {len(r['segments'])} segments"
                      + (f", {in_speech} of {len(cuts) - 1} cuts inside an utterance" if mode == "fixed" else "")
                      + f", {seconds:.0f} s", flush=True)
    info = {"package": args.long_audio, "corpus": args.corpus, "seed": args.seed, "marks": args.marks,
            "audio_seconds": round(len(wave) / 16000, 1), "utterances": len(texts), "rows": rows}
    print(json.dumps(info, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long-audio", metavar="PKG",
                    help="instead of the speed comparison: WER of VAD vs fixed segmentation on one long recording "
                         "made from --corpus, decoded by this (trained) package")
    ap.add_argument("--corpus", help="--long-audio: a demo corpus folder (test.list, wav/)")
    ap.add_argument("--minutes", type=float, default=5.0, help="--long-audio: shortest recording (default 5)")
    ap.add_argument("--max-seconds", type=float, nargs="+", default=[30.0],
                    help="--long-audio: the segment lengths to compare at (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="--long-audio: order of the utterances and pauses")
    ap.add_argument("--marks", type=float, default=30.0,
                    help="--long-audio: put a word on every multiple of this many seconds (default 30)")
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", default="auto", choices=["auto", "hf"], help="osum_torch_infer's decoding loop")
    ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="KV cache (both paths)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--compile-probe", action="store_true",
                    help="also time torch.compile (inductor) of the static-cache decode step vs eager, batch 1")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.long_audio:
        if not args.corpus:
            ap.error("--long-audio needs --corpus")
        return long_audio(args)

    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)

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
        cache = None if args.cache == "dynamic" else "static"
        gc = model.decoding_config("greedy", max_new_tokens=n, min_new_tokens=n, cache_implementation=cache)
        gc_osum = model.decoding_config("greedy", max_new_tokens=n, min_new_tokens=n)  # OSUM: default cache
        tokens = {}

        def ours(b):
            out = model.generate(feats[:b, :int(lengths[:b].max())], lengths[:b], [prompt] * b, generation_config=gc,
                                 engine=args.engine)
            assert all(len(r) == n for r in out), [len(r) for r in out]
            tokens[f"ours{b}"] = out

        @torch.inference_mode()
        def osum_prefix(i):
            f = torch.from_numpy(feats[i:i + 1, :int(lengths[i])]).to(dev)
            speech, slen = model.encode_speech(f, torch.from_numpy(lengths[i:i + 1]).to(dev))
            k = model.config.speech_token_num
            emb = osum_llm.get_input_embeddings()(torch.tensor([prompt], device=dev))
            return torch.cat([emb, model.speech_embed.weight[k:k + 1][None], speech,
                              model.speech_embed.weight[k + 1:k + 2][None]], dim=1)

        @torch.inference_mode()
        def osum_style(i=0):
            x = osum_prefix(i)
            out = osum_llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                                device=dev), generation_config=gc_osum)
            assert out.shape[1] == n
            tokens.setdefault("osum", {})[i] = out[0].tolist()

        # the two LLM paths compute the same function: same logits (merged vs unmerged LoRA) ...
        x, mask = model.build_prefix(feats[:1, :int(lengths[0])], lengths[:1], [prompt])
        with torch.inference_mode():
            a = model.llm(inputs_embeds=x, attention_mask=mask).logits
            b = osum_llm(inputs_embeds=x, attention_mask=mask).logits
        max_diff = float((a - b).abs().max() / a.abs().max())

        t = _time_round_robin({"osum": osum_style, "ours1": lambda: ours(1), "ours8": lambda: ours(8)}, args.repeats)
        to, t1, t8 = t["osum"], t["ours1"], t["ours8"]
        # ... and the same tokens: OSUM-style one by one == this package at batch 1 and at batch 8
        for i in range(1, 8):
            osum_style(i)
        same_tokens = (tokens["ours1"][0] == tokens["osum"][0]
                       and tokens["ours8"] == [tokens["osum"][i] for i in range(8)])
        if not same_tokens:
            raise SystemExit("token mismatch between the OSUM-style path and osum_torch_infer")

        # where the time goes (batch 1 and 8): audio tower, prefill, decode per token
        def audio(b):
            with torch.inference_mode():
                model.encode_speech(torch.from_numpy(feats[:b, :int(lengths[:b].max())]).to(dev),
                                    torch.from_numpy(lengths[:b]).to(dev))

        def prefill(llm, b):
            xb, mb = model.build_prefix(feats[:b, :int(lengths[:b].max())], lengths[:b], [prompt] * b)
            mb = None if bool(mb.all()) else mb
            return lambda: llm(inputs_embeds=xb, attention_mask=mb, logits_to_keep=1)

        with torch.inference_mode():
            parts = _time_round_robin({"audio1": lambda: audio(1), "audio8": lambda: audio(8),
                                       "prefill_osum1": prefill(osum_llm, 1), "prefill1": prefill(model.llm, 1),
                                       "prefill8": prefill(model.llm, 8)}, args.repeats)
        breakdown = {
            "osum-style batch 1": {"audio_tower_s": parts["audio1"], "prefill_s": parts["prefill_osum1"],
                                   "decode_s_per_token": (to - parts["audio1"] - parts["prefill_osum1"]) / (n - 1)},
            "osum_torch_infer batch 1": {"audio_tower_s": parts["audio1"], "prefill_s": parts["prefill1"],
                                         "decode_s_per_token": (t1 - parts["audio1"] - parts["prefill1"]) / (n - 1)},
            "osum_torch_infer batch 8": {"audio_tower_s": parts["audio8"], "prefill_s": parts["prefill8"],
                                         "decode_s_per_token": (t8 - parts["audio8"] - parts["prefill8"]) / (n - 1)},
        }
        if args.compile_probe:
            probe = compile_probe(model, feats[:1, :int(lengths[0])], lengths[:1], prompt, n)
    rows = {
        "osum-style (peft unmerged, batch 1)": {"batch": 1, "latency_s": to, "tokens_per_s": n / to},
        "osum_torch_infer batch 1": {"batch": 1, "latency_s": t1, "tokens_per_s": n / t1},
        "osum_torch_infer batch 8": {"batch": 8, "latency_s": t8, "tokens_per_s": 8 * n / t8},
    }
    info = {"config": args.config, "device": str(dev), "threads": torch.get_num_threads(), "new_tokens": n,
            "engine": args.engine, "cache": args.cache, "audio_frames": lengths.tolist(), "repeats": args.repeats,
            "build_and_export_s": round(build_s, 1), "merged_vs_peft_max_rel_logit_diff": max_diff,
            "same_tokens": same_tokens, "results": rows, "breakdown": breakdown,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "speedup_batch1": to / t1, "throughput_gain_batch8": (8 * n / t8) / (n / to)}
    print(f"config {args.config}, device {dev}, {torch.get_num_threads()} threads, {n} new tokens per utterance, "
          f"engine {args.engine}, {args.cache} cache, median of {args.repeats} (round-robin)")
    print("| path | batch | latency (s / generate call) | decode tokens/s | vs OSUM-style |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['batch']} | {r['latency_s']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / rows['osum-style (peft unmerged, batch 1)']['tokens_per_s']:.2f} |")
    print("| path | audio tower (s) | prefill (s) | decode (ms / token, derived) |")
    print("|---|---|---|---|")
    for name, r in breakdown.items():
        print(f"| {name} | {r['audio_tower_s']:.3f} | {r['prefill_s']:.3f} | {1000 * r['decode_s_per_token']:.2f} |")
    print(f"speed-up at batch 1: {info['speedup_batch1']:.2f}x; throughput at batch 8 vs OSUM-style batch 1: "
          f"{info['throughput_gain_batch8']:.2f}x; tokens identical: {same_tokens}; merged vs peft logits max rel "
          f"diff {max_diff:.2e}; load average {info['load_average']}")
    if args.compile_probe:
        info["compile_probe"] = probe
        print(f"torch.compile probe (static cache, batch 1, {n - 1} decode steps): eager "
              f"{1000 * probe['eager_s_per_token']:.2f} ms/token, compiled {1000 * probe['compiled_s_per_token']:.2f} "
              f"ms/token (median of {args.repeats} after a compiling pass of {probe['compile_pass_s']:.1f} s); "
              f"same tokens: {probe['same_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
