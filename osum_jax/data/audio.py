"""Audio decoding, resampling and Whisper/OSUM log-mel features (numpy only).

``log_mel_spectrogram`` reproduces OSUM's ``compute_log_mel_spectrogram`` (== Whisper's): STFT with
``n_fft=400``, ``hop=160``, periodic Hann window, centred with reflect padding; power spectrum with the last
frame dropped (``T = floor(N / 160)``); Slaney-style mel filters; ``log10(max(x, 1e-10))``; floor at
``max - 8``; ``(x + 4) / 4``. Computed in float64, returned float32 ``[T, n_mels]``.
"""

from __future__ import annotations

import functools
import io
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Audio that cannot be used (unreadable, empty, non-finite...)."""


def decode_audio(src: str | bytes | BinaryIO, *, start: float | None = None, end: float | None = None,
                 target_sr: int = 16000) -> tuple[np.ndarray, int, int]:
    """Decode ``src`` (path or bytes) to mono float32 at ``target_sr``.

    Returns ``(wave, original_sample_rate, original_num_samples)``. ``start``/``end`` (seconds) select a segment. Channels are
    averaged. Raises :class:`AudioError` for unreadable, empty or non-finite audio.
    """
    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    try:
        with sf.SoundFile(f) as snd:
            sr = snd.samplerate
            if start is not None or end is not None:
                first = int(round((start or 0.0) * sr))
                last = snd.frames if end is None else min(int(round(end * sr)), snd.frames)
                if first < 0 or first >= last:
                    raise AudioError(f"segment start={start} end={end} is empty (audio has {snd.frames / sr:.2f} s)")
                snd.seek(first)
                data = snd.read(last - first, dtype="float32", always_2d=True)
            else:
                data = snd.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError for corrupt input
        raise AudioError(f"cannot decode audio: {e}") from None
    if data.shape[0] == 0:
        raise AudioError("audio is empty")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise AudioError("audio contains NaN or Inf samples")
    n_orig = wave.shape[0]
    if sr != target_sr:
        wave = soxr.resample(wave, sr, target_sr, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), sr, n_orig


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    logstep = np.log(6.4) / 27.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, mel)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f = 200.0 * m / 3.0
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), f)


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 80) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters ``[n_mels, n_fft // 2 + 1]`` (librosa's default)."""
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2.0), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:n_mels + 2] - hz_pts[:n_mels]))[:, None]
    return weights


@functools.lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic, as torch.hann_window


def log_mel_spectrogram(wave: np.ndarray, n_mels: int = 80, *, sample_rate: int = 16000, n_fft: int = 400,
                        hop: int = 160) -> np.ndarray:
    """``wave [N]`` (16 kHz) -> log-mel ``[floor(N / hop), n_mels]`` float32."""
    wave = np.asarray(wave, np.float64)
    if wave.ndim != 1:
        raise AudioError(f"expected mono audio [N], got shape {wave.shape}")
    if wave.shape[0] < hop:
        raise AudioError(f"audio has {wave.shape[0]} samples; at least {hop} (one frame) are needed")
    pad = n_fft // 2
    if wave.shape[0] <= pad:  # reflect padding needs more samples than the pad width
        raise AudioError(f"audio too short for the STFT ({wave.shape[0]} samples)")
    x = np.pad(wave, (pad, pad), mode="reflect")
    n_frames = 1 + (x.shape[0] - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(x, (n_frames, n_fft), (x.strides[0] * hop, x.strides[0]))
    spec = np.fft.rfft(frames * _hann(n_fft), axis=-1)
    power = (spec.real ** 2 + spec.imag ** 2)[:-1]  # drop the last frame, as Whisper does
    mel = power @ mel_filters(sample_rate, n_fft, n_mels).T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def num_frames(num_samples: int, sample_rate: int) -> int:
    """OSUM's duration filter unit: 10 ms frames of the *original* audio (``samples / sr * 100``)."""
    return int(num_samples / sample_rate * 100)
