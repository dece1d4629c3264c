"""Bounded audio work for the server: the header decides before any sample is decoded, decoding never goes
past the header's frame count, and it runs in a bounded worker pool off the event loop.

:func:`decode_bounded` reads the header (sample rate, channels, frames) and refuses audio over ``max_seconds``,
a sample rate outside ``[MIN_RATE, MAX_RATE]`` or more than ``MAX_CHANNELS`` channels; only then does it read the
samples, in blocks of :data:`BLOCK` frames, averaging the channels and resampling each block to 16 kHz with a
streaming soxr resampler, so memory is the 16 kHz mono result plus one block, whatever the input's rate or
channel count. The samples are exactly those of :func:`osum_torch_infer.features.decode_audio` (soxr's
stream and one-shot resamplers give the same bits; ``tests/test_serve_abuse.py`` checks it).

:class:`WorkerPool` runs at most ``workers`` jobs at once; a caller waiting for a slot can be cancelled (a
client that went away), and a slot is given back only when its thread has finished, so a cancelled request
never lets more than ``workers`` jobs run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from typing import Any, BinaryIO, Callable

import numpy as np

from ..features import SAMPLE_RATE, AudioError, wav_truncation

MIN_RATE, MAX_RATE = 4000, 192000  # a sane range of input sample rates (telephone .. studio)
MAX_CHANNELS = 8
BLOCK = 1 << 16  # frames read at a time


class TooLong(AudioError):
    """Audio longer than the server takes (answered 413, not 400)."""


def probe(f: BinaryIO) -> tuple[int, int, int]:
    """``(sample_rate, channels, frames)`` from the header alone (:class:`AudioError` if unreadable)."""
    import soundfile as sf

    try:
        info = sf.info(f)
    except Exception as e:  # noqa: BLE001 - libsndfile's error text, without the file object's repr
        raise AudioError(f"cannot decode audio ({_reason(e)})") from None
    finally:
        f.seek(0)
    return int(info.samplerate), int(info.channels), int(info.frames)


def _reason(e: Exception) -> str:
    text = getattr(e, "error_string", None) or type(e).__name__
    return str(text).strip().rstrip(".") or type(e).__name__


def check_header(rate: int, channels: int, frames: int, max_seconds: float) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{channels} channels; at most {MAX_CHANNELS} are taken")
    if frames <= 0:
        raise AudioError("audio is empty")
    if frames > max_seconds * rate:
        raise TooLong(f"{frames / rate:.1f} s of audio > the server's {max_seconds:g} s")


def decode_bounded(f: BinaryIO, max_seconds: float, *, target_sr: int = SAMPLE_RATE,
                   block: int = BLOCK) -> np.ndarray:
    """Mono float32 at ``target_sr``; the header is checked first (:func:`check_header`), then at most the
    header's frames are read, block by block. :class:`AudioError` (or :class:`TooLong`) for unusable audio."""
    import soundfile as sf
    import soxr

    cut = wav_truncation(f)
    if cut is not None:
        raise AudioError(f"truncated WAV (header {cut[0]:.2f} s, file {cut[1]:.2f} s)")
    rate, channels, frames = probe(f)
    check_header(rate, channels, frames, max_seconds)
    stream = soxr.ResampleStream(rate, target_sr, 1, dtype="float32", quality="HQ") if rate != target_sr else None
    out: list[np.ndarray] = []
    done = 0
    try:
        with sf.SoundFile(f) as snd:
            if (snd.samplerate, snd.channels) != (rate, channels) or snd.frames > frames:
                raise AudioError("cannot decode audio (the header changed between reads)")
            while done < frames:
                data = snd.read(min(block, frames - done), dtype="float32", always_2d=True)
                if not len(data):
                    break
                done += len(data)
                mono = data.mean(axis=1) if channels > 1 else data[:, 0]
                if not np.isfinite(mono).all():
                    raise AudioError("audio contains NaN or Inf samples")
                out.append(stream.resample_chunk(mono, last=False) if stream is not None else mono.copy())
                del data, mono
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - libsndfile fails in many ways on hostile input: still the input's fault
        raise AudioError(f"cannot decode audio ({_reason(e)})") from None
    if not done:
        raise AudioError("audio is empty")
    if stream is not None:
        out.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def max_windows(max_seconds: float, window_s: float) -> int:
    """Windows of the longest audio the server takes (split as :func:`features.split_windows` does)."""
    return max(1, math.ceil(max_seconds / window_s))


class WorkerPool:
    """At most ``workers`` jobs in threads at a time; waiting callers are cancellable."""

    def __init__(self, workers: int, name: str = "osum-decode"):
        self.workers = max(1, int(workers))
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        self._slots: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            fut = self._executor.submit(fn, *args)
        except BaseException:
            self.running -= 1
            self._slots.release()
            raise

        def done(_):  # the slot is free when the thread is, not when the caller gave up
            def release():
                self.running -= 1
                self._slots.release()
            loop.call_soon_threadsafe(release)

        fut.add_done_callback(done)
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
