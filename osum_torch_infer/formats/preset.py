"""The package's small literal tables, written once: the decoding preset, the dtype names, the mel settings.

The exporter (``osum_jax.convert.torch_package``) writes them into a package (``generation_config.json``,
``config.json``'s ``torch_dtype`` and ``audio``, ``processor_config.json``); the runtime reads them back
(``modeling.decoding_config``, ``processing_osum``, ``features``). numpy-free, torch-free, JAX-free.
"""

from __future__ import annotations

from typing import Any, Mapping

# -- the decoding preset -----------------------------------------------------------------------------------------

# OSUM's decoding parameters (reference section 8), as Hugging Face GenerationConfig fields: the ``osum`` preset,
# written to a package's generation_config.json
OSUM_GENERATION = {"max_new_tokens": 400, "min_length": 1, "num_beams": 4, "do_sample": True, "top_k": 5,
                   "top_p": 0.9, "temperature": 1.0, "repetition_penalty": 1.05, "length_penalty": 1.0}
SPECIAL_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")
DECODINGS = ("greedy", "beam", "osum")


def generation_file(eos_token_id: int) -> dict:
    """What ``generation_config.json`` holds: the ``osum`` preset and the special ids (all the end-of-text id)."""
    return dict(OSUM_GENERATION, **{k: int(eos_token_id) for k in SPECIAL_IDS})


def decoding_preset(decoding: str, eos_token_id: int, file: Mapping[str, Any] | None = None) -> dict:
    """GenerationConfig fields for ``greedy`` (deterministic), ``beam`` (deterministic, 4 beams) or ``osum``
    (:data:`OSUM_GENERATION`, then what the package's ``generation_config.json`` (``file``) says).
    ``max_new_tokens`` is the file's (else 400) for every preset. ``ValueError`` for another name."""
    file = dict(file or {})
    common = {k: eos_token_id for k in SPECIAL_IDS}
    common["max_new_tokens"] = int(file.get("max_new_tokens", OSUM_GENERATION["max_new_tokens"]))
    if decoding == "greedy":
        return dict(common, do_sample=False, num_beams=1)
    if decoding == "beam":
        return dict(common, do_sample=False, num_beams=4, length_penalty=1.0)
    if decoding == "osum":
        kw = dict(common, **{k: v for k, v in OSUM_GENERATION.items() if k != "max_new_tokens"})
        kw.update({k: v for k, v in file.items() if k not in SPECIAL_IDS})
        return kw
    raise ValueError(f"unknown decoding {decoding!r}; expected greedy, beam or osum")


# -- dtype names ---------------------------------------------------------------------------------------------------

# floating dtypes by either spelling; every command accepts both (``bf16`` = ``bfloat16``, ...)
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # the safetensors header's names


def dtype_long(name: str) -> str:
    """``bf16``/``bfloat16`` -> ``bfloat16`` (also fp16/fp32); ``ValueError`` listing both spellings."""
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected bf16|fp16|fp32 (or bfloat16|float16|float32)") from None


def dtype_short(name: str) -> str:
    """``bfloat16``/``bf16`` -> ``bf16`` (also fp16/fp32)."""
    return SHORT_DTYPE[dtype_long(name)]


# -- the mel settings ----------------------------------------------------------------------------------------------

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MAX_SECONDS = 30.0


def mel_settings(num_mel_bins: int, max_frames: int | None = None) -> dict:
    """``config.json``'s ``audio``: the front end's settings (as :func:`osum_torch_infer.features.
    log_mel_spectrogram` computes them)."""
    out = {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop_length": HOP, "num_mel_bins": int(num_mel_bins)}
    if max_frames is not None:
        out["max_frames"] = int(max_frames)
    return out


def read_mel_settings(audio: Mapping[str, Any], num_mel_bins: int) -> dict:
    """A package's ``audio`` settings with the defaults filled in (older packages wrote none)."""
    return {"sample_rate": int(audio.get("sample_rate", SAMPLE_RATE)), "n_fft": int(audio.get("n_fft", N_FFT)),
            "hop_length": int(audio.get("hop_length", HOP)),
            "num_mel_bins": int(audio.get("num_mel_bins", num_mel_bins))}


# -- processor_config.json -----------------------------------------------------------------------------------------

PROCESSOR_FILE = "processor_config.json"
PROCESSOR_CLASS = "OSUMProcessor"


def processor_config(mel: Mapping[str, Any], prompts: Mapping[str, list], pad_token_id: int | None,
                     eod_token: str, padding_value: float = 0.0) -> dict:
    """``processor_config.json``: the feature extractor's settings, the prompt book and the special ids (what
    ``OSUMProcessor.save_pretrained`` writes and the exporter writes into every package)."""
    return {"processor_class": PROCESSOR_CLASS,
            "feature_extractor": {"feature_size": int(mel["num_mel_bins"]), "sampling_rate": int(mel["sample_rate"]),
                                  "hop_length": int(mel["hop_length"]), "n_fft": int(mel["n_fft"]),
                                  "padding_value": float(padding_value)},
            "prompts": {k: list(v) for k, v in prompts.items()}, "pad_token_id": pad_token_id,
            "eod_token": eod_token}
