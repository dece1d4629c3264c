"""OSUM in PyTorch on transformers' own machinery, as Qwen2-Audio: a Whisper-style encoder and OSUM's adapter
(:mod:`osum_torch_infer.audio`) beside ``transformers.Qwen2ForCausalLM``.

``OSUMForConditionalGeneration`` is a ``PreTrainedModel`` + ``GenerationMixin`` with :class:`OSUMConfig`
(``model_type`` ``"osum"``); importing this module registers both with ``AutoConfig`` / ``AutoModel``, and
:class:`~osum_torch_infer.processing_osum.OSUMProcessor` with ``AutoProcessor``, so a package loads with
``AutoModel.from_pretrained(PKG)`` too (never ``trust_remote_code``). Loading is transformers' ``from_pretrained``
(shard index, meta-device build, dtype, device map); this class adds the checks that name the package's files, the
peft adapter merge and the float16 range check. The device/dtype choice, NPU fusions and the float16 calibration
warning are the runtime's policy: :func:`osum_torch_infer.loading.load_model`.

``generate`` has transformers' signature (``input_features``, ``feature_attention_mask``, ``input_ids``,
``attention_mask``: what the processor returns); :meth:`OSUMForConditionalGeneration.generate_tokens` is the
runtime's token-list call.

``model(batch)`` follows the shared batch contract (``feats``, ``feats_lengths``, ``prompt`` (pad -1),
``prompt_lengths``, ``target`` (pad -100), ``target_lengths``) and returns ``loss``, ``logits [B, L, V]`` and
``num_tokens``; the sequence is ``[prompt][bos speech eos][target]`` with masked holes and
``position_ids = cumsum(valid) - 1``, exactly as the JAX model.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoProcessor, GenerationMixin, PreTrainedModel,
                          Qwen2ForCausalLM)

from . import contract
from .attention import ATTN_IMPLEMENTATION  # registers SDPA with NaN-safe masks (see attention.py)
from .audio import Adapter, AudioTower, WhisperEncoder, padding_mask
from .configuration_osum import OSUMConfig
from .decoding import (check_loop_guard, fast_greedy_unsupported, greedy_decode, hf_compiles_decode,
                       loop_stopping_criteria, trim_loop)
from .formats.preset import decoding_preset
from .loading import AUDIO_PREFIXES, cast_parameters, check_tensors, merge_adapter  # noqa: F401
from .package import AdapterConfig, EncoderConfig, PackageConfig, PackageError, read_prompts  # noqa: F401
from .processing_osum import OSUMFeatureExtractor, OSUMProcessor

log = logging.getLogger("osum_torch_infer")
# generate() arguments that are not GenerationConfig fields (they need transformers' generate)
_GENERATE_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                       "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask")


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


class OSUMPreTrainedModel(PreTrainedModel):
    config_class = OSUMConfig
    base_model_prefix = "osum"
    main_input_name = "input_ids"  # what GenerationMixin drives (the LLM step); audio enters via build_prefix
    _no_split_modules = ["Qwen2DecoderLayer", "EncoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Random models keep each module's own initialisation (PyTorch's for the audio side, Qwen2's for the
        LLM); packages overwrite every tensor."""


class OSUMForConditionalGeneration(OSUMPreTrainedModel, GenerationMixin):
    """The OSUM model. Load with :meth:`from_pretrained`; ``model(batch)`` for loss/logits, :meth:`generate`."""

    def __init__(self, config: OSUMConfig):
        super().__init__(config)
        config.text_config._attn_implementation = ATTN_IMPLEMENTATION
        d_llm = int(config.text_config.hidden_size)
        self.encoder = WhisperEncoder(config.encoder)
        self.adapter = Adapter(config.encoder.d_model, d_llm, config.adapter)
        self.speech_embed = nn.Embedding(config.speech_token_num + 2, d_llm)
        self.llm = Qwen2ForCausalLM(config.text_config)
        self.eos_token_id = config.eos_token_id
        self.processor = None  # an OSUMProcessor (tokenizer + prompt book), set by from_pretrained
        self.generation_defaults: dict = {}
        self.path: Path | None = None
        self.device_reason = ""
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args,
                        **kwargs) -> "OSUMForConditionalGeneration":
        """Load a package written by ``osum-convert export-torch`` as transformers loads a model
        (``AutoModel.from_pretrained`` ends here too): ``dtype`` (``"auto"`` or absent: the stored dtype; a
        ``torch.dtype``), ``device_map`` (absent: CPU) and transformers' other arguments, plus the checks that name
        the package's files, the peft adapter merge (``--no-merge-lora`` packages) and the processor (tokenizer +
        prompt book). No device choice, dtype policy or float16 calibration check here: those are
        :func:`osum_torch_infer.loading.load_model`'s.

        Called with the runtime's policy arguments (``device=``, ``parts=``, ``npu_fusions=``, or a dtype alias
        such as ``"fp32"``), this is :func:`~osum_torch_infer.loading.load_model` (the earlier signature)."""
        from .loading import POLICY_DTYPES, load_model

        dtype = kwargs.get("dtype")
        if any(k in kwargs for k in ("device", "parts", "npu_fusions")) or (isinstance(dtype, str)
                                                                         and dtype in POLICY_DTYPES):
            return load_model(pretrained_model_name_or_path, *model_args, model_class=cls, **kwargs)
        return cls.load_package(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def load_package(cls, root: str | Path, *model_args, dtype: str | torch.dtype | None = "auto",
                     device_map=None, **kwargs) -> "OSUMForConditionalGeneration":
        """transformers' ``from_pretrained`` on a package directory, with its checks: the tensor names and shapes
        against the model's (every difference named), the peft adapter merge, ``dtype`` (``None``/``"auto"``:
        the stored one) cast one tensor at a time with the float16 range check, and the processor."""
        root = Path(root)
        if not root.is_dir():
            raise PackageError(f"{root} is not a package directory")
        pkg = PackageConfig.from_json(root / "config.json")
        kwargs.pop("config", None)  # AutoModel passes the config it read; the package schema reads it here
        kwargs.pop("torch_dtype", None)
        config = OSUMConfig.from_package(pkg)
        stored = _stored_dtype(pkg.torch_dtype)
        dt = stored if dtype in (None, "auto") else dtype
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"dtype={dtype!r}: expected 'auto' or a torch.dtype (or use osum_torch_infer.loading."
                             f"load_model for fp32/fp16/bf16)")
        if not pkg.lora.get("merged", True) and not (root / "adapter_config.json").is_file():
            raise PackageError(f"{root}/config.json says lora.merged=false but adapter_config.json is missing")
        tied = bool(config.text_config.tie_word_embeddings)
        with torch.device("meta"):
            skeleton = cls(config)
        check_tensors(root, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()
                             if not (tied and k == "llm.lm_head.weight")})
        del skeleton
        # read at the stored dtype (the adapter merge and the float16 check need the stored values), then cast
        model, info = super().from_pretrained(
            root, *model_args, config=config, dtype=stored, device_map=device_map or "cpu",
            attn_implementation=ATTN_IMPLEMENTATION, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        _check_loading_info(root, info, tied=tied)
        cast_parameters(model, dt, root)
        model.eval().requires_grad_(False)
        model.path = root
        model._load_text_side(root)
        return model

    def load_adapter(self, adapter_path: str | Path, *args, **kwargs) -> dict:
        """transformers' ``from_pretrained`` calls this when the package holds ``adapter_config.json``
        (``--no-merge-lora``): the peft LoRA is merged into the LLM's weights (``W += alpha / r * B @ A``)."""
        from transformers.utils.loading_report import LoadStateDictInfo

        merge_adapter(self.llm, Path(adapter_path))
        return LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                                 conversion_errors={}, skipped_pp_keys=set())

    def _load_text_side(self, root: Path) -> None:
        self.processor = OSUMProcessor.from_pretrained(root)
        gfile = root / "generation_config.json"
        if gfile.is_file():
            try:
                self.generation_defaults = json.loads(gfile.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise PackageError(f"cannot read {gfile}: {e}") from None
        # transformers loaded generation_config.json as the model's defaults, and generate() fills every field a
        # passed configuration leaves unset from them (OSUM's repetition penalty would leak into greedy decoding):
        # the file is the `osum` preset of decoding_config(); the model's own defaults are only the special ids
        from transformers import GenerationConfig

        eos = self.eos_token_id
        self.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)

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

    def forward(self, batch: Mapping[str, Any] | None = None, *, input_ids=None, inputs_embeds=None,
                attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        """Two entry points.

        * ``model(batch)``: the batch contract -> ``{"loss", "logits" [B, L, V] float32, "num_tokens"}`` (as the
          JAX model; the sequence is ``[prompt][bos speech eos][target]``).
        * ``model(input_ids=... | inputs_embeds=..., attention_mask=..., past_key_values=...)``: the LLM step that
          transformers' ``GenerationMixin`` drives (``generate(inputs_embeds=prefix)`` after :meth:`build_prefix`);
          returns the LLM's ``CausalLMOutputWithPast``.
        """
        if batch is None:
            return self.llm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
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

    def decoding_config(self, decoding: str = "greedy", **overrides):
        """A ``transformers.GenerationConfig``: ``greedy`` (default, deterministic), ``beam`` (deterministic beam
        search, ``num_beams`` default 4) or ``osum`` (OSUM's preset from generation_config.json: 4 beams with
        sampling, top-k 5, top-p 0.9, repetition penalty 1.05). ``overrides`` are GenerationConfig fields."""
        from transformers import GenerationConfig

        kw = decoding_preset(decoding, self.eos_token_id, self.generation_defaults)
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

    def generate(self, *args, **kwargs):
        """transformers' signature, as Qwen2-Audio: ``generate(input_features=[B, n_mels, T],
        feature_attention_mask=[B, T], input_ids=prompt ids [B, P] (left-padded), attention_mask=[B, P], ...)``
        (what :class:`~osum_torch_infer.processing_osum.OSUMProcessor` returns, so
        ``model.generate(**processor(audio, task=...))`` works) returns what transformers' ``generate`` returns
        given ``inputs_embeds``: the new tokens ``[B, T]`` (end-of-text, then pad, after a row ends), or a
        ``GenerateOutput`` with ``return_dict_in_generate=True``. See :meth:`generate_from_features`.

        The earlier call ``generate(feats, feats_lengths, prompts, ...)`` (or ``feats=``) still returns token lists:
        it is :meth:`generate_tokens`."""
        if args or "feats" in kwargs:
            return self.generate_tokens(*args, **kwargs)
        return self.generate_from_features(**kwargs)

    def _generation_config(self, decoding: str | None, generation_config, overrides: dict):
        if generation_config is not None:
            gc = copy.deepcopy(generation_config)
            gc.update(**{k: v for k, v in overrides.items() if v is not None})  # overrides apply here too
            return gc
        return self.decoding_config(decoding or "greedy", **overrides)

    def _decode_prefix(self, x: torch.Tensor, mask: torch.Tensor, gc, engine: str, guard, hf_kwargs: dict):
        """The prefix ``x``/``mask`` decoded by the lean greedy loop or transformers' ``generate``."""
        if engine not in ("auto", "hf", "fast"):
            raise ValueError(f"unknown engine {engine!r}; expected auto, hf or fast")
        why = fast_greedy_unsupported(gc) if engine != "hf" else "engine='hf'"
        if not why and hf_kwargs:
            why = f"generate() arguments {sorted(hf_kwargs)}"
        if engine == "auto" and not why:
            why = hf_compiles_decode(gc, self.device)
        if engine == "fast" and why:
            raise ValueError(f"engine='fast' supports plain greedy decoding only: {why}")
        if why:
            extra = dict(hf_kwargs)
            if guard:
                stops = loop_stopping_criteria(*guard)
                if extra.get("stopping_criteria"):
                    stops.extend(extra["stopping_criteria"])
                extra["stopping_criteria"] = stops
            return GenerationMixin.generate(self, inputs_embeds=x, attention_mask=mask, generation_config=gc,
                                            **extra)
        return greedy_decode(self.llm, x, mask, gc, loop_guard=guard)

    @torch.inference_mode()
    def generate_from_features(self, input_features, feature_attention_mask=None, input_ids=None,
                               attention_mask=None, generation_config=None, *, decoding: str | None = None,
                               engine: str = "auto", loop_repeats: int = 0, loop_max_ngram: int = 8, **kwargs):
        """``input_features [B, n_mels, T]`` with ``feature_attention_mask [B, T]`` (1 = real frame; all frames
        when omitted) and the prompt ``input_ids [B, P]`` with ``attention_mask [B, P]`` (its 1s; all ids when
        omitted; no prompt when ``input_ids`` is omitted) -> transformers' ``generate`` output (new tokens only).

        ``decoding`` (``greedy``, ``beam``, ``osum``: :meth:`decoding_config`) or ``generation_config`` give the
        settings; other keyword arguments are ``GenerationConfig`` fields or ``generate`` arguments
        (``stopping_criteria``, ``logits_processor``, ``streamer``, ...). ``engine`` and the loop guard
        (``loop_repeats``, ``loop_max_ngram``) as in :meth:`generate_tokens` (a stopped row is not trimmed here)."""
        hf_kwargs = {k: kwargs.pop(k) for k in _GENERATE_ARGUMENTS if k in kwargs}
        gc = self._generation_config(decoding, generation_config, kwargs)
        check_loop_guard(loop_repeats, loop_max_ngram)
        guard = (int(loop_repeats), int(loop_max_ngram)) if loop_repeats else None
        feats = _as_tensor(input_features, self.device).transpose(1, 2)
        b, t = feats.shape[:2]
        lengths = (_as_tensor(feature_attention_mask, self.device, torch.long).sum(-1)
                   if feature_attention_mask is not None else torch.full((b,), t, dtype=torch.long))
        if input_ids is None:
            prompts = [[] for _ in range(b)]
        else:
            ids = _as_tensor(input_ids, torch.device("cpu"), torch.long)
            keep = (_as_tensor(attention_mask, torch.device("cpu"), torch.long).bool() if attention_mask is not None
                    else torch.ones_like(ids, dtype=torch.bool))
            prompts = [ids[i][keep[i]].tolist() for i in range(ids.shape[0])]
        x, mask = self.build_prefix(feats, lengths, prompts)
        return self._decode_prefix(x, mask, gc, engine, guard, hf_kwargs)

    @torch.inference_mode()
    def generate_tokens(self, feats, feats_lengths, prompts: Sequence[Sequence[int]], decoding: str = "greedy",
                        generation_config=None, *, engine: str = "auto", loop_repeats: int = 0,
                        loop_max_ngram: int = 8, **overrides) -> list[list[int]]:
        """Batched generation from ``feats [B, T, n_mels]``; returns each row's new tokens up to (excluding) the
        end-of-text id (the runtime's own callers use this; :meth:`generate` is transformers' signature).

        ``engine``: ``auto`` (default) decodes plain greedy configurations with :func:`~osum_torch_infer.decoding.greedy_decode` (a lean loop
        over ``Qwen2ForCausalLM``'s model and a transformers KV cache: the same tokens as ``transformers``'
        ``generate``, less per-token overhead) and everything else (beam search, sampling, repetition penalty,
        ...) with ``transformers``' ``generate``; ``hf`` always uses ``generate``; ``fast`` requires the lean loop
        (``ValueError`` if the configuration needs ``generate``).

        Loop guard: with ``loop_repeats`` K >= 2, a row whose new tokens end in one n-gram (``n <= loop_max_ngram``)
        repeated K times in a row stops there, in either engine and in beam search (a beam that loops is finished),
        and keeps one copy of that n-gram; other rows go on. ``no_repeat_ngram_size`` (a GenerationConfig field,
        transformers' ``generate``) forbids any repeated n-gram instead."""
        gc = self._generation_config(decoding, generation_config, overrides)
        check_loop_guard(loop_repeats, loop_max_ngram)
        guard = (int(loop_repeats), int(loop_max_ngram)) if loop_repeats else None
        if engine not in ("auto", "hf", "fast"):
            raise ValueError(f"unknown engine {engine!r}; expected auto, hf or fast")
        x, mask = self.build_prefix(feats, feats_lengths, prompts)
        out = self._decode_prefix(x, mask, gc, engine, guard, {})
        ends = gc.eos_token_id if gc.eos_token_id is not None else self.eos_token_id
        ends = {ends} if isinstance(ends, int) else set(ends)
        result = []
        for row in out.tolist():  # up to (excluding) the first end id of the configuration
            row = next((row[:i] for i, t in enumerate(row) if t in ends), row)
            result.append(trim_loop(row, *guard) if guard else row)
        return result

    # -- text side: the processor's (kept here for the runtime's callers) ---------------------------------------

    @property
    def tokenizer(self):
        return None if self.processor is None else self.processor.tokenizer

    @property
    def prompts(self) -> dict[str, list[str]]:
        return {} if self.processor is None else self.processor.prompts

    def _text_processor(self):
        if self.processor is None:
            raise ValueError("this model has no processor (tokenizer + prompt book): load the package with "
                             "from_pretrained / load_model")
        return self.processor

    def prompt_for(self, task: str) -> str:
        """The first prompt of ``task`` in the package's prompt file (``<no_prompt>`` = empty): the processor's."""
        return self._text_processor().prompt_for(task)

    def encode_text(self, text: str) -> list[int]:
        return self._text_processor().encode_text(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self._text_processor().decode_text(ids)


def _stored_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise PackageError(f"config.json: torch_dtype {name!r} is not a torch dtype")
    return dt


def _check_loading_info(root: Path, info: Mapping[str, Any], *, tied: bool) -> None:
    """transformers reports what it could not load instead of failing; a package must match exactly."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not (tied and k == "llm.lm_head.weight"))
    unexpected = sorted(info.get("unexpected_keys", ()))
    bad = sorted(str(m) for m in info.get("mismatched_keys", ()))
    if missing or unexpected or bad:
        raise PackageError(f"{root} does not match its config.json: missing {missing[:10]} ({len(missing)}), "
                           f"unexpected {unexpected[:10]} ({len(unexpected)}), shape mismatches {bad[:10]}")


def check_batch(batch: Mapping[str, Any], model: OSUMForConditionalGeneration) -> None:
    """Validate a batch against the contract (:func:`osum_torch_infer.contract.check_batch`); raises
    ``ValueError`` naming the key."""
    contract.check_batch(batch, num_mel_bins=model.config.encoder.num_mel_bins,
                         vocab_size=int(model.config.text_config.vocab_size))


AutoConfig.register(OSUMConfig.model_type, OSUMConfig, exist_ok=True)
AutoModel.register(OSUMConfig, OSUMForConditionalGeneration, exist_ok=True)
AutoFeatureExtractor.register(OSUMConfig, OSUMFeatureExtractor, exist_ok=True)
AutoProcessor.register(OSUMConfig, OSUMProcessor, exist_ok=True)
