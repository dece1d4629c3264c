"""Audio decoding and the Whisper/OSUM log-mel front end (numpy only): the one implementation, shared by this
runtime and the JAX training pipeline (``osum_jax.data.audio`` re-exports it), so both compute the same features.

``log_mel_spectrogram``: STFT with ``n_fft=400``, ``hop=160``, periodic Hann window, centred with reflect padding;
power spectrum without the last frame (``T = floor(N / 160)``); Slaney mel filters; ``log10(max(x, 1e-10))``;
floor at ``max - 8``; ``(x + 4) / 4``. Computed in float64, returned float32 ``[T, n_mels]``.
"""

from __future__ import annotations

import functools
import io
import math
from typing import BinaryIO

import numpy as np

from .formats.preset import HOP, MAX_SECONDS, N_FFT, SAMPLE_RATE  # noqa: F401 (the mel settings, written once)


class AudioError(ValueError):
    """Audio that cannot be used (unreadable, empty, non-finite, too short)."""


def decode_audio(src: str | bytes | BinaryIO, *, start: float | None = None, end: float | None = None,
                 target_sr: int = SAMPLE_RATE) -> tuple[np.ndarray, int, int]:
    """Decode ``src`` (path, bytes or file) to mono float32 at ``target_sr`` (channels averaged, soxr HQ).

    Returns ``(wave, original_sample_rate, original_num_samples)``; ``start``/``end`` (seconds) select a segment.
    Raises :class:`AudioError` for unreadable, empty or non-finite audio. The training pipeline
    (``osum_jax.data``) uses this same function, so training and serving see the same samples.
    """
    import soundfile as sf

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
        import soxr

        wave = soxr.resample(wave, sr, target_sr, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32), sr, n_orig


def audio_length(src: str | bytes | BinaryIO, *, start: float | None = None,
                 end: float | None = None) -> tuple[int, int]:
    """``(sample_rate, samples)`` of ``src`` (or of its ``start``/``end`` segment) from the header alone, without
    decoding: lets a caller reject over-long audio before it costs memory. :class:`AudioError` if unreadable."""
    import soundfile as sf

    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    try:
        info = sf.info(f)
    except Exception as e:
        raise AudioError(f"cannot decode audio: {e}") from None
    finally:
        if hasattr(f, "seek"):
            f.seek(0)
    sr, n = int(info.samplerate), int(info.frames)
    first = int(round((start or 0.0) * sr))
    last = n if end is None else min(int(round(end * sr)), n)
    return sr, max(0, last - first)


def wav_truncation(src: str | bytes | BinaryIO) -> tuple[float, float] | None:
    """``(seconds the header promises, seconds the file holds)`` for a RIFF/WAVE file whose ``data`` chunk is
    cut short (an interrupted copy or download), else ``None`` (also for other formats). libsndfile silently
    reads such a file to its end, so its length alone cannot tell."""
    import struct

    if isinstance(src, (bytes, bytearray)):
        head, size = bytes(src[:4096]), len(src)
    elif isinstance(src, str):
        try:
            with open(src, "rb") as f:
                head = f.read(4096)
                size = f.seek(0, io.SEEK_END)
        except OSError:
            return None
    else:
        pos = src.tell()
        head = src.read(4096)
        size = src.seek(0, io.SEEK_END)
        src.seek(pos)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    i, byte_rate = 12, 0
    while i + 8 <= len(head):
        cid, n = head[i:i + 4], struct.unpack("<I", head[i + 4:i + 8])[0]
        if cid == b"fmt " and i + 16 <= len(head):
            byte_rate = struct.unpack("<I", head[i + 16:i + 20])[0]
        if cid == b"data":
            have = size - (i + 8)
            if byte_rate and n != 0xFFFFFFFF and have < n:  # 0xFFFFFFFF: a streamed WAV of unknown length
                return n / byte_rate, max(have, 0) / byte_rate
            return None
        i += 8 + n + (n & 1)
    return None


def load_audio(src: str | bytes | BinaryIO, *, start: float | None = None, end: float | None = None,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """:func:`decode_audio`'s samples only: mono float32 ``[N]`` at ``sample_rate``."""
    return decode_audio(src, start=start, end=end, target_sr=sample_rate)[0]


def _hz_to_mel(f):
    f = np.asarray(f, np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, 3.0 * f / 200.0)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = 80) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters ``[n_mels, n_fft // 2 + 1]`` (float64; librosa's default)."""
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    ramps = hz[:, None] - freqs[None, :]
    widths = np.diff(hz)
    tri = np.maximum(0.0, np.minimum(-ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]))
    return tri * (2.0 / (hz[2:] - hz[:-2]))[:, None]


@functools.lru_cache(maxsize=8)
def _mel_taps(sample_rate: int, n_fft: int, n_mels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`mel_filters` as its non-zero taps: ``(bins, weights, starts, empty)``, filter by filter (each
    filter's bins are one short run: at most 14 of the 201 for 80 filters at n_fft 400)."""
    filters = mel_filters(sample_rate, n_fft, n_mels)
    rows, bins = np.nonzero(filters)  # row-major: grouped by filter, bins ascending
    starts = np.minimum(np.searchsorted(rows, np.arange(n_mels)), max(len(rows) - 1, 0))
    empty = np.bincount(rows, minlength=n_mels) == 0
    return bins, filters[rows, bins], starts, empty


def _apply_mel(power: np.ndarray, sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """``power [T, n_fft // 2 + 1] @ mel_filters().T``, summing only the filters' taps, in a fixed order and without
    BLAS: a multi-threaded BLAS spends ~5x longer on this small product when other work holds the cores (the
    training step beside the input pipeline), and its kernels differ per CPU."""
    bins, weights, starts, empty = _mel_taps(sample_rate, n_fft, n_mels)
    if not len(bins):
        return np.zeros((power.shape[0], n_mels))
    mel = np.add.reduceat(power[:, bins] * weights, starts, axis=1)
    mel[:, empty] = 0.0
    return mel


def log_mel_spectrogram(wave: np.ndarray, n_mels: int = 80, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                        hop: int = HOP) -> np.ndarray:
    """``wave [N]`` (16 kHz mono) -> log-mel ``[floor(N / hop), n_mels]`` float32."""
    x = np.asarray(wave, np.float64)
    if x.ndim != 1:
        raise AudioError(f"expected mono audio [N], got shape {x.shape}")
    if x.shape[0] < hop:
        raise AudioError(f"audio has {x.shape[0]} samples; at least {hop} (one frame) are needed")
    if x.shape[0] <= n_fft // 2:  # reflect padding needs more samples than the pad width
        raise AudioError(f"audio too short for the STFT ({x.shape[0]} samples; at least {n_fft // 2 + 1} needed)")
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = 1 + (x.shape[0] - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(x, (n_frames, n_fft), (x.strides[0] * hop, x.strides[0]))
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spec = np.fft.rfft(frames * window, axis=-1)
    power = (spec.real ** 2 + spec.imag ** 2)[:-1]
    mel = _apply_mel(power, sample_rate, n_fft, n_mels)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def split_windows(wave: np.ndarray, max_seconds: float = MAX_SECONDS,
                  sample_rate: int = SAMPLE_RATE) -> list[tuple[float, np.ndarray]]:
    """Split audio longer than ``max_seconds`` into equal windows of at most ``max_seconds``.

    Returns ``[(start_seconds, samples), ...]``; audio that fits is returned whole.
    """
    limit = int(max_seconds * sample_rate)
    n = wave.shape[0]
    if n <= limit:
        return [(0.0, wave)]
    k = math.ceil(n / limit)
    size = math.ceil(n / k)
    return [(i * size / sample_rate, wave[i * size:(i + 1) * size]) for i in range(k)]
