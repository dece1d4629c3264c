"""Audio decoding, resampling and Whisper/OSUM log-mel features (numpy only).

``log_mel_spectrogram`` reproduces OSUM's ``compute_log_mel_spectrogram`` (== Whisper's): STFT with
``n_fft=400``, ``hop=160``, periodic Hann window, centred with reflect padding; power spectrum with the last
frame dropped (``T = floor(N / 160)``); Slaney-style mel filters; ``log10(max(x, 1e-10))``; floor at
``max - 8``; ``(x + 4) / 4``. Computed in float64, returned float32 ``[T, n_mels]``.

The implementation lives in :mod:`osum_torch_infer.features` (numpy + soundfile + soxr, no torch), which the
serving runtime uses too: one front end, so a model never sees different features in training and in serving.
Importing it pulls in neither torch nor JAX.
"""

from __future__ import annotations

from osum_torch_infer.features import (AudioError, audio_length, decode_audio, log_mel_spectrogram, mel_filters,
                                       wav_truncation)

__all__ = ["AudioError", "audio_length", "decode_audio", "log_mel_spectrogram", "mel_filters", "num_frames",
           "wav_truncation"]


def num_frames(num_samples: int, sample_rate: int) -> int:
    """OSUM's duration filter unit: 10 ms frames of the *original* audio (``samples / sr * 100``)."""
    return int(num_samples / sample_rate * 100)
