"""OSUM in PyTorch: a hand-written Whisper-style encoder and adapter + ``transformers.Qwen2ForCausalLM``.

Same numerics as the JAX model (``osum_jax.models``): padding frames are zeroed before each convolution and every
utterance's valid length is ``ceil(L / 2)`` after the encoder and ``ceil(L / 8)`` after the adapter, so an
utterance in a padded batch gets exactly its batch-size-1 result. LayerNorm runs in float32; logits are float32.

``model(batch)`` follows the shared batch contract (``feats``, ``feats_lengths``, ``prompt`` (pad -1),
``prompt_lengths``, ``target`` (pad -100), ``target_lengths``) and returns ``loss``, ``logits [B, L, V]`` and
``num_tokens``; the sequence is ``[prompt][bos speech eos][target]`` with masked holes and
``position_ids = cumsum(valid) - 1``, exactly as the JAX model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import contract
from .devices import apply_npu_fusions, resolve_dtype, select_device
from .package import (FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, AdapterConfig, EncoderConfig,  # noqa: F401
                      OSUMConfig, PackageError)

log = logging.getLogger("osum_torch_infer")
AUDIO_PREFIXES = ("encoder.", "adapter.", "speech_embed.")  # the audio tower's tensors (+ the speech markers)

# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------


def layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32 whatever the compute dtype (as the JAX model)."""
    y = F.layer_norm(x.float(), module.normalized_shape, module.weight.float(), module.bias.float(), module.eps)
    return y.to(x.dtype)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B] -> [B, T]`` bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "relu": F.relu, "silu": F.silu}


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, key_bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=key_bias)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block (Whisper ``ResidualAttentionBlock`` == wenet ``normalize_before`` layer)."""

    def __init__(self, d: int, heads: int, ffn: int, act: str, key_bias: bool, eps: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = SelfAttention(d, heads, key_bias)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(layer_norm(self.self_attn_layer_norm, x), mask)
        return x + self.fc2(self.act(self.fc1(layer_norm(self.final_layer_norm, x))))


class WhisperEncoder(nn.Module):
    """``feats [B, T, M]``, ``lengths [B]`` -> ``[B, ceil(T/2), D]``, lengths ``ceil(L/2)`` (Hugging Face names)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, "gelu", cfg.key_bias,
                                                 cfg.layer_norm_eps) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.max_frames = 2 * cfg.max_source_positions

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = feats.shape[1]
        valid = padding_mask(lengths, t)[:, None, :]  # [B, 1, T]
        x = feats.transpose(1, 2).to(self.conv1.weight.dtype) * valid
        x = F.gelu(self.conv1(x)) * valid  # the stride-2 conv must not see activations of padding frames
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        t1 = x.shape[1]
        out_lengths = (lengths + 1) // 2
        x = x + self.embed_positions.weight[:t1].to(x.dtype)
        mask = padding_mask(out_lengths, t1)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return layer_norm(self.layer_norm, x), out_lengths


class Adapter(nn.Module):
    """OSUM's link: 3 causal convs + GELU, Linear + LN, x*sqrt(D) + ESPnet table, blocks, LN, Linear to the LLM."""

    def __init__(self, d: int, d_llm: int, cfg: AdapterConfig):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(d, d, cfg.conv_kernel, stride=s) for s in cfg.conv_strides)
        self.input_proj = nn.Linear(d, d)
        self.input_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.embed_positions = nn.Embedding(cfg.max_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.activation, True,
                                                 cfg.layer_norm_eps) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d_llm)
        self.kernel = cfg.conv_kernel
        self.strides = tuple(cfg.conv_strides)
        self.xscale = math.sqrt(d)
        self.max_positions = cfg.max_positions

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = h.transpose(1, 2)
        for conv, s in zip(self.convs, self.strides):
            x = F.gelu(conv(F.pad(x, (self.kernel - 1, 0))))  # causal: valid outputs never see right padding
            lengths = (lengths + s - 1) // s
        x = x.transpose(1, 2)
        t = x.shape[1]
        x = layer_norm(self.input_norm, self.input_proj(x))
        x = x * self.xscale + self.embed_positions.weight[:t].to(x.dtype)
        mask = padding_mask(lengths, t)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.proj(layer_norm(self.layer_norm, x)), lengths


class AudioTower(nn.Module):
    """Encoder + adapter + projection: ``feats [B, T, M]``, ``feats_lengths [B]`` -> ``[B, T3, D_llm]``, lengths.

    The unit exported to ONNX (``osum-infer export-onnx``)."""

    def __init__(self, encoder: WhisperEncoder, adapter: Adapter):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter

    def forward(self, feats: torch.Tensor, feats_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, lengths = self.encoder(feats, feats_lengths)
        return self.adapter(h, lengths)


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


class OSUMForConditionalGeneration(nn.Module):
    """The OSUM model. Load with :meth:`from_pretrained`; ``model(batch)`` for loss/logits, :meth:`generate`."""

    def __init__(self, config: OSUMConfig):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from .attention import ATTN_IMPLEMENTATION  # registers SDPA with NaN-safe masks (see attention.py)

        self.config = config
        d_llm = int(config.llm["hidden_size"])
        self.encoder = WhisperEncoder(config.encoder)
        self.adapter = Adapter(config.encoder.d_model, d_llm, config.adapter)
        self.speech_embed = nn.Embedding(config.speech_token_num + 2, d_llm)
        llm_cfg = {k: v for k, v in config.llm.items() if k not in ("architectures", "model_type", "torch_dtype")}
        self.qwen2_config = Qwen2Config(**llm_cfg)
        self.qwen2_config._attn_implementation = ATTN_IMPLEMENTATION
        self.llm = Qwen2ForCausalLM(self.qwen2_config)
        self.eos_token_id = config.eos_token_id
        self.tokenizer = None
        self.prompts: dict[str, list[str]] = {}
        self.generation_defaults: dict = {}
        self.path: Path | None = None

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", *, merge_lora: bool = True,
                        npu_fusions: bool = True, parts: str = "all") -> "OSUMForConditionalGeneration":
        """Load a package written by ``osum-convert export-torch``.

        ``device``: ``auto`` (cuda, then npu, then cpu), ``cuda[:N]``, ``npu[:N]``, ``cpu``. ``dtype``: ``auto``
        (float32 on CPU, the package dtype on accelerators), ``fp32``, ``fp16``, ``bf16``. A package exported with
        ``--no-merge-lora`` has its peft adapters merged into the weights at load time (in float32).
        ``parts="audio"`` reads only the audio tower's tensors (encoder, adapter): the LLM stays on the meta device
        and is unusable (what ONNX export of the tower needs, at ~0.3 B instead of 8 B parameters).
        """
        if parts not in ("all", "audio"):
            raise ValueError(f"parts={parts!r}: expected 'all' or 'audio'")
        keep = (lambda k: True) if parts == "all" else (lambda k: k.startswith(AUDIO_PREFIXES))
        from safetensors import safe_open

        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"{root} is not a package directory")
        cfg = OSUMConfig.from_json(root / "config.json")
        dev, why = select_device(device)
        dt = resolve_dtype(dtype, dev, cfg.torch_dtype)
        log.info("osum_torch_infer: %s on %s, %s (%s; dtype %s)", root, dev, str(dt).replace("torch.", ""), why,
                 dtype if dtype not in (None, "auto") else f"auto: package {cfg.torch_dtype}")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if keep(k)}

        files = _weight_files(root)
        state: dict[str, torch.Tensor] = {}
        where: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if not keep(key):
                        continue
                    if key in state:
                        raise PackageError(f"{f.name}: tensor {key!r} also stored in {where[key]}")
                    state[key] = sf.get_tensor(key)
                    where[key] = f.name
        if cfg.llm.get("tie_word_embeddings"):
            expected.pop("llm.lm_head.weight", None)
        lora_file = root / "adapter_model.safetensors"
        if not cfg.lora.get("merged", True) and parts == "all":
            if not lora_file.is_file():
                raise PackageError(f"{root}/config.json says lora.merged=false but {lora_file.name} is missing")
            _merge_peft(state, root, cfg)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad = [f"{k}: file {tuple(state[k].shape)} != model {expected[k]} ({where.get(k, '?')})"
               for k in expected if k in state and tuple(state[k].shape) != expected[k]]
        if missing or unexpected or bad:
            raise PackageError(f"{root} does not match its config.json: missing {missing[:10]} "
                               f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
                               f"shape mismatches {bad[:10]}")
        # one tensor at a time (the source copy is dropped as soon as it is converted); a cast to float16 must
        # not turn large values into inf silently (the Ascend 310P path has no bf16)
        overflow = []
        for k in list(state):
            src = state.pop(k)
            t = src.to(device=dev, dtype=dt)
            if dt == torch.float16 and src.dtype != torch.float16 and src.is_floating_point():
                if not bool(torch.isfinite(t).all()) and bool(torch.isfinite(src).all()):
                    overflow.append(f"{k} (max |x| {float(src.abs().max()):.4g})")
            state[k] = t
        if overflow:
            raise PackageError(f"{root}: values beyond the float16 range (65504) in {len(overflow)} tensor(s): "
                               f"{overflow[:10]}; load in bf16/fp32, or export with --dtype fp16 to see the check "
                               f"at export time")
        model.load_state_dict(state, strict=not cfg.llm.get("tie_word_embeddings") and parts == "all", assign=True)
        if cfg.llm.get("tie_word_embeddings") and parts == "all":
            model.llm.tie_weights()
        # non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them
        with torch.device(dev):
            model.llm.model.rotary_emb = type(model.llm.model.rotary_emb)(config=model.qwen2_config)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                    if t.is_meta and keep(n)]
        if leftover:
            raise PackageError(f"{root}: tensors not initialised from the package: {leftover[:10]}")
        model.eval().requires_grad_(False)
        if dev.type == "npu" and npu_fusions and parts == "all":
            apply_npu_fusions(model.llm)
        model.path = root
        model.device_reason = why
        warning = (cfg.metadata.get("prompts") or {}).get("warning")
        if warning:
            log.warning("osum_torch_infer: %s: %s", root, warning)
        if dt == torch.float16:
            from .calibrate import REPORT, passing_report

            if not passing_report(root):
                log.warning("osum_torch_infer: %s runs in float16 without a passing %s next to it: Qwen2 "
                            "activations and attention scores can exceed 65504 (the 310P saturates silently); run "
                            "`osum-infer calibrate-fp16 --model %s --data LIST` on CPU first", root, REPORT, root)
        model._load_text_side(root)
        return model

    def _load_text_side(self, root: Path) -> None:
        import yaml
        from transformers import PreTrainedTokenizerFast

        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise PackageError(f"{root}: tokenizer.json is missing")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        pfile = root / self.config.prompts_file
        try:
            prompts = yaml.safe_load(pfile.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise PackageError(f"cannot read the prompt file {pfile}: {e}") from None
        from .parsing import normalize_task

        if not isinstance(prompts, dict):
            raise PackageError(f"{pfile}: expected a mapping {{task: [prompts]}}")
        self.prompts = {normalize_task(k): ([v] if isinstance(v, str) else list(v)) for k, v in prompts.items()}
        gfile = root / "generation_config.json"
        if gfile.is_file():
            try:
                self.generation_defaults = json.loads(gfile.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise PackageError(f"cannot read {gfile}: {e}") from None

    @property
    def device(self) -> torch.device:
        return self.speech_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.speech_embed.weight.dtype

    def audio_tower(self) -> AudioTower:
        return AudioTower(self.encoder, self.adapter)

    # -- forward ------------------------------------------------------------------------------------------------

    def encode_speech(self, feats: torch.Tensor, feats_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = feats.shape[1]
        if t > self.encoder.max_frames:
            raise ValueError(f"feats have {t} frames; the encoder accepts at most {self.encoder.max_frames} (30 s); "
                             f"split longer audio into windows (transcribe() does)")
        h, lengths = self.encoder(feats.to(self.dtype), feats_lengths)
        return self.adapter(h, lengths)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Batch contract -> ``{"loss", "logits" [B, L, V] float32, "num_tokens"}`` (as the JAX model)."""
        check_batch(batch, self)
        dev = self.device
        feats = _as_tensor(batch["feats"], dev, self.dtype)
        flen = _as_tensor(batch["feats_lengths"], dev, torch.long)
        speech, slen = self.encode_speech(feats, flen)
        b, t3, d = speech.shape
        parts, valids = [], []
        if "prompt" in batch and np.shape(batch["prompt"])[1] > 0:
            prompt = _as_tensor(batch["prompt"], dev, torch.long)
            pv = padding_mask(_as_tensor(batch["prompt_lengths"], dev, torch.long), prompt.shape[1])
            parts.append(self._embed_ids(torch.where(pv, prompt, 0)))
            valids.append(pv)
        p = sum(x.shape[1] for x in valids)
        bos = self.speech_embed.weight[self.config.speech_token_num]
        eos = self.speech_embed.weight[self.config.speech_token_num + 1]
        ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
        target = _as_tensor(batch["target"], dev, torch.long)
        tv = padding_mask(_as_tensor(batch["target_lengths"], dev, torch.long), target.shape[1])
        parts += [bos.expand(b, 1, d), speech.to(self.dtype), eos.expand(b, 1, d),
                  self._embed_ids(torch.where(tv & (target >= 0), target, 0))]
        valids += [ones, padding_mask(slen, t3), ones, tv]
        valid = torch.cat(valids, dim=1)
        positions = torch.where(valid, valid.long().cumsum(1) - 1, 1)
        hidden = self.llm.model(inputs_embeds=torch.cat(parts, dim=1), attention_mask=valid.long(),
                                position_ids=positions, use_cache=False).last_hidden_state
        start, length = p + t3 + 1, target.shape[1]
        logits = self.llm.lm_head(hidden[:, start:start + length]).float()
        mask = tv & (target >= 0)
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, torch.where(mask, target, 0)[..., None])[..., 0]
        n = mask.sum().float()
        loss = torch.where(mask, nll, 0.0).sum() / n.clamp(min=1.0)
        return {"loss": loss, "logits": logits, "num_tokens": n}

    # -- generation ---------------------------------------------------------------------------------------------

    def generation_config(self, decoding: str = "greedy", **overrides):
        """A ``transformers.GenerationConfig``: ``greedy`` (default, deterministic), ``beam`` (deterministic beam
        search, ``num_beams`` default 4) or ``osum`` (OSUM's preset from generation_config.json: 4 beams with
        sampling, top-k 5, top-p 0.9, repetition penalty 1.05). ``overrides`` are GenerationConfig fields."""
        from transformers import GenerationConfig

        osum = self.generation_defaults
        common = dict(eos_token_id=self.eos_token_id, pad_token_id=self.eos_token_id, bos_token_id=self.eos_token_id,
                      max_new_tokens=int(osum.get("max_new_tokens", 400)))
        if decoding == "greedy":
            kw = dict(common, do_sample=False, num_beams=1)
        elif decoding == "beam":
            kw = dict(common, do_sample=False, num_beams=4, length_penalty=1.0)
        elif decoding == "osum":
            kw = dict(common, min_length=1, num_beams=4, do_sample=True, top_k=5, top_p=0.9, temperature=1.0,
                      repetition_penalty=1.05, length_penalty=1.0)
            kw.update({k: v for k, v in osum.items() if k not in ("eos_token_id", "pad_token_id", "bos_token_id")})
        else:
            raise ValueError(f"unknown decoding {decoding!r}; expected greedy, beam or osum")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationConfig(**kw)

    def build_prefix(self, feats: torch.Tensor, feats_lengths: torch.Tensor,
                     prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[prompt][bos speech eos]`` embeddings ``[B, S, D]`` and the attention mask ``[B, S]``."""
        dev = self.device
        speech, slen = self.encode_speech(_as_tensor(feats, dev, self.dtype), _as_tensor(feats_lengths, dev,
                                                                                        torch.long))
        n = self.config.speech_token_num
        bos, eos = self.speech_embed.weight[n:n + 1], self.speech_embed.weight[n + 1:n + 2]
        rows = []
        for i in range(speech.shape[0]):
            ids = torch.as_tensor(list(prompts[i]), dtype=torch.long, device=dev)
            rows.append(torch.cat([self._embed_ids(ids), bos, speech[i, :int(slen[i])].to(self.dtype), eos]))
        s = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), s, rows[0].shape[1], dtype=self.dtype, device=dev)
        mask = torch.zeros(len(rows), s, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            x[i, s - r.shape[0]:] = r
            mask[i, s - r.shape[0]:] = 1
        return x, mask

    @torch.inference_mode()
    def generate(self, feats, feats_lengths, prompts: Sequence[Sequence[int]], decoding: str = "greedy",
                 generation_config=None, *, engine: str = "auto", **overrides) -> list[list[int]]:
        """Batched generation; returns each row's new tokens up to (excluding) the end-of-text id.

        ``engine``: ``auto`` (default) decodes plain greedy configurations with :meth:`greedy_decode` (a lean loop
        over ``Qwen2ForCausalLM``'s model and a transformers KV cache: the same tokens as ``transformers``'
        ``generate``, less per-token overhead) and everything else (beam search, sampling, repetition penalty,
        ...) with ``transformers``' ``generate``; ``hf`` always uses ``generate``; ``fast`` requires the lean loop
        (``ValueError`` if the configuration needs ``generate``)."""
        if generation_config is not None:
            gc = copy.deepcopy(generation_config)
            gc.update(**{k: v for k, v in overrides.items() if v is not None})  # overrides apply here too
        else:
            gc = self.generation_config(decoding, **overrides)
        if engine not in ("auto", "hf", "fast"):
            raise ValueError(f"unknown engine {engine!r}; expected auto, hf or fast")
        why = fast_greedy_unsupported(gc) if engine != "hf" else "engine='hf'"
        if engine == "auto" and not why:
            why = hf_compiles_decode(gc, self.device)
        if engine == "fast" and why:
            raise ValueError(f"engine='fast' supports plain greedy decoding only: {why}")
        x, mask = self.build_prefix(feats, feats_lengths, prompts)
        if why:
            out = self.llm.generate(inputs_embeds=x, attention_mask=mask, generation_config=gc)
        else:
            out = self.greedy_decode(x, mask, gc)
        ends = gc.eos_token_id if gc.eos_token_id is not None else self.eos_token_id
        ends = {ends} if isinstance(ends, int) else set(ends)
        result = []
        for row in out.tolist():  # up to (excluding) the first end id of the configuration
            result.append(next((row[:i] for i, t in enumerate(row) if t in ends), row))
        return result

    @torch.inference_mode()
    def greedy_decode(self, x: torch.Tensor, mask: torch.Tensor, generation_config) -> torch.Tensor:
        """Greedy decoding of left-padded prefix embeddings ``x [B, S, D]`` / ``mask [B, S]`` (from
        :meth:`build_prefix`): the new tokens ``[B, T]``, as ``llm.generate(inputs_embeds=x, ...)`` returns them.

        Computes exactly what ``transformers``' greedy ``generate`` computes (same model forward, same inputs:
        positions from the mask, no mask at all when nothing is padded, logits of the last position only, EOS
        masked while fewer than ``min_new_tokens`` tokens exist, argmax) without its per-token machinery
        (logits processors, stopping criteria, kwargs bookkeeping, output dataclasses). The KV cache is a
        transformers ``DynamicCache``, or a ``StaticCache`` (preallocated, no per-step concatenation) when
        ``generation_config.cache_implementation == "static"``. Finished rows are fed the pad id, as in
        ``generate``; decoding stops when every row has ended or after ``max_new_tokens`` tokens."""
        from transformers import DynamicCache, StaticCache

        gc = generation_config
        llm = self.llm
        b, s, _ = x.shape
        max_new = int(gc.max_new_tokens)
        min_new = int(gc.min_new_tokens or 0)
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=x.device)
        pad = int(gc.pad_token_id if gc.pad_token_id is not None else eos_ids[0])
        mask = mask.to(torch.long)
        static = gc.cache_implementation == "static"
        padded = not bool(mask.all())
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        # generate() drops an all-ones mask (SDPA then runs causal without a mask); a static cache always needs one
        full_mask = torch.cat([mask, mask.new_ones(b, max_new)], dim=1) if (padded or static) else None
        cache = (StaticCache(config=llm.config, max_cache_len=s + max_new) if static
                 else DynamicCache(config=llm.config))
        out = llm(inputs_embeds=x, attention_mask=None if full_mask is None else full_mask[:, :s],
                  position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        del out
        pos = positions[:, -1:]
        unfinished = torch.ones(b, dtype=torch.bool, device=x.device)
        tokens = []
        # a host sync per token is free on CPU; on accelerators look at the stop condition every few tokens
        check_every = 1 if x.device.type == "cpu" else 8
        for t in range(max_new):
            if t < min_new:
                logits.index_fill_(1, eos_ids, -math.inf)
            nxt = logits.argmax(-1)
            nxt = torch.where(unfinished, nxt, pad)
            tokens.append(nxt)
            unfinished &= ~(nxt[:, None] == eos_ids[None, :]).any(-1)  # torch.isin falls back to CPU on NPU
            if t == max_new - 1 or ((t + 1) % check_every == 0 and not bool(unfinished.any())):
                break
            pos = pos + 1
            hidden = llm.model(input_ids=nxt[:, None], position_ids=pos, past_key_values=cache, use_cache=True,
                               attention_mask=None if full_mask is None else full_mask[:, :s + t + 1])
            logits = llm.lm_head(hidden.last_hidden_state[:, -1]).float()
        return torch.stack(tokens, dim=1)

    # -- text side ----------------------------------------------------------------------------------------------

    def prompt_for(self, task: str) -> str:
        """The first prompt of ``task`` in the package's prompt file (``<no_prompt>`` = empty)."""
        from .parsing import normalize_task

        key = normalize_task(task)
        if key not in self.prompts:
            raise ValueError(f"task {key!r} is not in the package's prompt file ({self.config.prompts_file}); "
                             f"known tasks: {sorted(self.prompts)}; or pass a prompt text")
        p = self.prompts[key][0]
        return "" if p == "<no_prompt>" else p

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# GenerationConfig fields the lean greedy loop implements (or that do not affect greedy decoding's tokens)
_FAST_GREEDY_FIELDS = {"eos_token_id", "pad_token_id", "bos_token_id", "max_new_tokens", "min_new_tokens",
                       "do_sample", "num_beams", "length_penalty", "early_stopping", "temperature", "top_k", "top_p",
                       "use_cache", "cache_implementation", "transformers_version", "disable_compile",
                       "num_return_sequences", "min_length", "max_length"}


def hf_compiles_decode(gc, device: torch.device) -> str:
    """Non-empty when transformers' ``generate`` would ``torch.compile`` the decode step (a static cache on
    cuda/xpu, or ``compile_config._compile_all_devices``; not with ``disable_compile``): the same criteria as
    ``generate``'s auto-compilation. ``engine="auto"`` then leaves decoding to ``generate``, whose compiled step
    (CUDA graphs under ``mode="reduce-overhead"``) beats an eager loop on GPUs; the lean loop stays eager. On
    CPU a compiled step was measured at most ~20 % faster per token after 15-40 s of compilation, so it is off."""
    if gc.cache_implementation != "static" or gc.disable_compile:
        return ""
    every_device = bool(gc.compile_config is not None and getattr(gc.compile_config, "_compile_all_devices", None))
    if device.type in ("cuda", "xpu") or every_device:
        return f"static cache on {device.type}: transformers compiles the decode step"
    return ""


def fast_greedy_unsupported(gc) -> str:
    """Why ``gc`` needs transformers' ``generate`` (``""`` when :meth:`greedy_decode` computes it exactly)."""
    d = gc.to_diff_dict()
    other = sorted(k for k in d if k not in _FAST_GREEDY_FIELDS and not k.startswith("_"))
    if other:
        return f"fields {other}"
    if gc.do_sample or (gc.num_beams or 1) != 1:
        return "sampling / beam search"
    if (gc.num_return_sequences or 1) != 1:
        return "num_return_sequences != 1"
    if gc.max_new_tokens is None:
        return "max_new_tokens is not set"
    if gc.min_length:
        return "min_length (use min_new_tokens)"
    if gc.cache_implementation not in (None, "dynamic", "static"):
        return f"cache_implementation={gc.cache_implementation!r}"
    if gc.use_cache is False:
        return "use_cache=False"
    return ""


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise PackageError(f"cannot read {index}: {e}") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
    elif single.is_file():
        files = [single]
    else:
        raise PackageError(f"{root}: neither model.safetensors nor model.safetensors.index.json found")
    for f in files:
        if not f.is_file():
            raise PackageError(f"{root}: weight file {f.name} (listed in the index) is missing")
    return files


def _merge_peft(state: dict[str, torch.Tensor], root: Path, cfg: OSUMConfig) -> None:
    """Merge ``adapter_model.safetensors`` (peft names) into the base weights: ``W += alpha / r * B @ A``."""
    from safetensors.torch import load_file

    acfg_file = root / "adapter_config.json"
    try:
        acfg = json.loads(acfg_file.read_text(encoding="utf-8"))
        r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PackageError(f"cannot read r/lora_alpha from {acfg_file}: {e}") from None
    unsupported = {k: acfg[k] for k in ("use_rslora", "use_dora", "fan_in_fan_out") if acfg.get(k)}
    unsupported.update({k: acfg[k] for k in ("rank_pattern", "alpha_pattern") if acfg.get(k)})
    if unsupported:
        raise PackageError(f"{acfg_file}: adapter options {unsupported} are not supported (plain LoRA only: "
                           f"W += lora_alpha / r * B @ A); merge the adapter with peft before packaging")
    scaling = alpha / r
    adapters = load_file(str(root / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapters.items():
        if not key.startswith("base_model.model.") or not (".lora_A." in key or ".lora_B." in key):
            raise PackageError(f"adapter_model.safetensors: unexpected tensor {key!r}")
        which = "A" if ".lora_A." in key else "B"
        base = key[len("base_model.model."):].split(f".lora_{which}.")[0]
        pairs.setdefault(base, {})[which] = t
    for base, ab in pairs.items():
        target = f"llm.{base}.weight"
        if set(ab) != {"A", "B"}:
            raise PackageError(f"adapter_model.safetensors: {base} has only lora_{''.join(ab)}")
        if target not in state:
            raise PackageError(f"adapter_model.safetensors: {base} has no base weight {target!r}")
        w = state[target]
        merged = w.float() + scaling * (ab["B"].float() @ ab["A"].float())
        state[target] = merged.to(w.dtype) if w.dtype != torch.float32 else merged


def check_batch(batch: Mapping[str, Any], model: OSUMForConditionalGeneration) -> None:
    """Validate a batch against the contract (:func:`osum_torch_infer.contract.check_batch`); raises
    ``ValueError`` naming the key."""
    contract.check_batch(batch, num_mel_bins=model.config.encoder.num_mel_bins,
                         vocab_size=int(model.config.llm["vocab_size"]))
