"""The input pipeline: OSUM/wenet corpora -> Grain -> static-shape numpy batches (see ``pipeline.py``)."""

from .audio import AudioError, decode_audio, log_mel_spectrogram, mel_filters
from .pipeline import BucketSpec, DataPipeline, SampleProcessor, skip_counts
from .records import SampleError
from .shards import TarShardSource
from .sources import MixedSource, RawListSource, open_source
from .text import PromptBook, Tokenizer, normalize_label, normalize_task

__all__ = [
    "AudioError", "BucketSpec", "DataPipeline", "MixedSource", "PromptBook", "RawListSource", "SampleError",
    "SampleProcessor", "TarShardSource", "Tokenizer", "decode_audio", "log_mel_spectrogram", "mel_filters",
    "normalize_label", "normalize_task", "open_source", "skip_counts",
]
