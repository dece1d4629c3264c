"""``OSUMProcessor``: the feature extractor, the tokenizer and the prompt book of an OSUM package, as transformers'
``Qwen2AudioProcessor`` pairs Whisper's feature extractor with Qwen2's tokenizer.

``processor(audio, task="<TRANSCRIBE>")`` returns a ``BatchFeature`` holding ``input_features [B, n_mels, T]`` and
``feature_attention_mask [B, T]`` (Qwen2-Audio's names and layout), and the task's prompt as ``input_ids [B, P]``
with ``attention_mask`` (left-padded); ``model.generate(**processor(audio, task=...))`` decodes it and
``processor.batch_decode(out)`` reads the result. The log-mel front end is :func:`osum_torch_infer.features.
log_mel_spectrogram` (the one the JAX trainer uses too).

``save_pretrained(DIR)`` writes ``processor_config.json`` (front-end settings, the prompt book, the special ids),
``preprocessor_config.json`` and the tokenizer files; ``from_pretrained(DIR)`` reads them (``osum-convert
export-torch`` writes ``processor_config.json`` into every package), or, in an older package without it, builds the
processor from the package's ``config.json``, ``tokenizer.json`` and prompt file. Importing :mod:`osum_torch_infer`
registers the class with ``AutoProcessor`` (and the feature extractor with ``AutoFeatureExtractor``) when the model
module is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from transformers import BatchFeature, PreTrainedTokenizerFast, ProcessorMixin, SequenceFeatureExtractor

from .features import HOP, N_FFT, SAMPLE_RATE, log_mel_spectrogram
from .files import atomic_file
from .formats import prompts as prompt_book
from .formats.preset import PROCESSOR_FILE, processor_config, read_mel_settings
from .package import PackageConfig, PackageError, read_prompts


class OSUMFeatureExtractor(SequenceFeatureExtractor):
    """Whisper/OSUM log-mel features (:func:`~osum_torch_infer.features.log_mel_spectrogram`), unpadded length kept:
    ``input_features [B, n_mels, T_max]`` (zero padding) and ``attention_mask [B, T_max]`` (1 for real frames)."""

    model_input_names = ["input_features", "attention_mask"]

    def __init__(self, feature_size: int = 80, sampling_rate: int = SAMPLE_RATE, hop_length: int = HOP,
                 n_fft: int = N_FFT, padding_value: float = 0.0, **kwargs):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         **kwargs)
        self.hop_length, self.n_fft = int(hop_length), int(n_fft)

    def __call__(self, raw_speech, sampling_rate: int | None = None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        if sampling_rate is not None and int(sampling_rate) != self.sampling_rate:
            raise ValueError(f"audio at {sampling_rate} Hz: this feature extractor takes {self.sampling_rate} Hz "
                             f"mono (osum_torch_infer.load_audio resamples)")
        waves = _as_batch(raw_speech)
        mels = [log_mel_spectrogram(w, self.feature_size, sample_rate=self.sampling_rate, n_fft=self.n_fft,
                                    hop=self.hop_length) for w in waves]
        t = max(m.shape[0] for m in mels)
        feats = np.full((len(mels), self.feature_size, t), self.padding_value, np.float32)
        mask = np.zeros((len(mels), t), np.int32)
        for i, m in enumerate(mels):
            feats[i, :, :m.shape[0]] = m.T
            mask[i, :m.shape[0]] = 1
        return BatchFeature({"input_features": feats, "attention_mask": mask}, tensor_type=return_tensors)


class OSUMProcessor(ProcessorMixin):
    """Feature extractor + tokenizer + prompt book. ``prompts``: ``{task: [prompt texts]}`` (``<no_prompt>`` = an
    empty prompt); ``pad_token_id``: what left-pads ``input_ids`` (the end-of-text id)."""

    def __init__(self, feature_extractor=None, tokenizer=None, prompts: dict | None = None,
                 pad_token_id: int | None = None, eod_token: str = "<|endoftext|>", **kwargs):
        self.prompts = prompt_book.parse_book(prompts, "the processor's prompts") if prompts else {}
        self.pad_token_id = pad_token_id
        self.eod_token = eod_token
        super().__init__(feature_extractor, tokenizer, **kwargs)

    # -- the prompt book ----------------------------------------------------------------------------------------

    def prompt_for(self, task: str) -> str:
        """The first prompt of ``task`` in the prompt book (``<no_prompt>`` = empty)."""
        return prompt_book.first(self.prompts, task)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- calling ------------------------------------------------------------------------------------------------

    def __call__(self, audio=None, task: str | Sequence[str] | None = None, prompt: str | Sequence[str] | None = None,
                 sampling_rate: int | None = None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """``audio``: one 16 kHz mono waveform or a list; ``task`` (one for all, or one per waveform) picks the
        prompt from the prompt book, ``prompt`` gives the text instead. Returns ``input_features``,
        ``feature_attention_mask``, ``input_ids`` (the prompt, left-padded) and ``attention_mask``."""
        if audio is None:
            raise ValueError("OSUMProcessor needs audio")
        waves = _as_batch(audio)
        n = len(waves)
        texts = _per_row(prompt, n, "prompt") if prompt is not None else [
            self.prompt_for(t) for t in _per_row(task, n, "task")]
        feats = self.feature_extractor(waves, sampling_rate=sampling_rate, return_tensors=None)
        ids = [self.encode_text(t) for t in texts]
        p = max(len(x) for x in ids)
        pad = self.pad_token_id if self.pad_token_id is not None else (self.tokenizer.pad_token_id or 0)
        input_ids = np.full((n, p), pad, np.int64)
        mask = np.zeros((n, p), np.int64)
        for i, x in enumerate(ids):
            if x:
                input_ids[i, p - len(x):] = x
                mask[i, p - len(x):] = 1
        return BatchFeature({"input_features": feats["input_features"],
                             "feature_attention_mask": feats["attention_mask"], "input_ids": input_ids,
                             "attention_mask": mask}, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_features", "feature_attention_mask", "input_ids", "attention_mask"]

    # -- files --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        fe = self.feature_extractor
        mel = {"num_mel_bins": fe.feature_size, "sample_rate": fe.sampling_rate, "hop_length": fe.hop_length,
               "n_fft": fe.n_fft}
        return processor_config(mel, self.prompts, self.pad_token_id, self.eod_token, fe.padding_value)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """``processor_config.json`` (front end, prompt book, pad id), ``preprocessor_config.json`` and the
        tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``)."""
        if push_to_hub:
            raise ValueError("OSUMProcessor.save_pretrained: push_to_hub is not supported")
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.feature_extractor.save_pretrained(root)
        files = [str(f) for f in self.tokenizer.save_pretrained(root)]
        out = root / PROCESSOR_FILE
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [str(out), *files]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "OSUMProcessor":
        """A directory written by :meth:`save_pretrained`, or a package (``config.json`` + ``tokenizer.json`` +
        prompt file) without ``processor_config.json``. Local directories only."""
        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            raise PackageError(f"{root} is not a local directory (OSUMProcessor reads packages on disk)")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise PackageError(f"{root}: tokenizer.json is missing")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        pfile = root / PROCESSOR_FILE
        if pfile.is_file():
            try:
                d = json.loads(pfile.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise PackageError(f"cannot read {pfile}: {e}") from None
            fe = OSUMFeatureExtractor(**d.get("feature_extractor", {}))
            return cls(fe, tokenizer, prompts=d.get("prompts") or {}, pad_token_id=d.get("pad_token_id"),
                       eod_token=d.get("eod_token", "<|endoftext|>"))
        pkg = PackageConfig.from_json(root / "config.json")
        mel = read_mel_settings(pkg.audio, pkg.encoder.num_mel_bins)
        fe = OSUMFeatureExtractor(feature_size=mel["num_mel_bins"], sampling_rate=mel["sample_rate"],
                                  hop_length=mel["hop_length"], n_fft=mel["n_fft"])
        return cls(fe, tokenizer, prompts=read_prompts(root, pkg.prompts_file), pad_token_id=pkg.eos_token_id,
                   eod_token=pkg.eod_token)


def _as_batch(audio) -> list[np.ndarray]:
    if isinstance(audio, np.ndarray) and audio.ndim == 1 or (
            isinstance(audio, (list, tuple)) and audio and np.isscalar(audio[0])):
        return [np.asarray(audio, np.float32)]
    if hasattr(audio, "detach"):  # a torch tensor
        audio = audio.detach().cpu().numpy()
    if isinstance(audio, np.ndarray) and audio.ndim == 2:
        return [np.asarray(a, np.float32) for a in audio]
    waves = [np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, np.float32) for a in audio]
    if not waves:
        raise ValueError("no audio given")
    return waves


def _per_row(value, n: int, name: str) -> list:
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{len(value)} {name}s for {n} waveforms")
    return value
