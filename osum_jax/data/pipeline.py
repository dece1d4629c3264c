"""The Grain input pipeline: records -> features/tokens -> static-shape batches.

::

    MapDataset.range(N).repeat(epochs)        global element g; epoch = g // N
      [process_index :: process_count]        ShardByJaxProcess: disjoint, complete coverage per epoch
      .map(SampleProcessor)                   shuffle (per-epoch permutation), read record, tokenise, prompt,
                                              decode + resample + log-mel, filters, SpecAug/SpecSub
      .to_iter_dataset()
      BucketBatcher                           skip bad samples (counted), length buckets, pad -> numpy batch
      .mp_prefetch(num_workers)               optional worker processes

Everything random (shuffle, prompt choice, augmentation) is a pure function of ``(seed, epoch, record)``.
The batcher's checkpoint state holds the element numbers waiting in its buckets, not their tensors; on
restore they are recomputed, so a restored pipeline yields exactly the batches that would have come next.

Static shapes: a batch has ``F`` frames from ``data.frame_buckets``, ``L`` target tokens from
``data.target_buckets`` and ``P = data.max_prompt_tokens``; its batch size is fixed per (F, L) by the frame
and token budgets. So a run has at most ``len(frame_buckets) * len(target_buckets)`` shapes (15 by default).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import grain
import numpy as np
from osum_torch_infer.contract import IGNORE_ID, PAD_PROMPT

from ..config import ConfigError, DataConfig
from .audio import AudioError, audio_length, decode_audio, log_mel_spectrogram, num_frames, wav_truncation
from .augment import spec_aug, spec_sub
from .records import SampleError, check_record
from .sources import detect_format, open_source
from .text import PromptBook, Tokenizer, normalize_label, normalize_task, remap_style

log = logging.getLogger("osum_jax.data")

# --------------------------------------------------------------------------------------------------------------
# per-sample processing
# --------------------------------------------------------------------------------------------------------------


class SampleProcessor:
    """Element number ``g`` -> processed example dict, or a ``{"skip": reason, ...}`` marker.

    Pure and picklable: Grain workers and the batcher's restore path call it with the same results.
    """

    def __init__(self, cfg: DataConfig, source, tokenizer: Tokenizer, prompts: PromptBook, *, train: bool):
        self.cfg, self.source, self.tok, self.prompts, self.train = cfg, source, tokenizer, prompts, train
        self.n = len(source)

    @functools.lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)

    def record_of(self, g: int) -> tuple[int, int]:
        epoch, pos = divmod(int(g), self.n)
        shuffle = self.cfg.shuffle and self.train
        return (int(self._permutation(epoch)[pos]) if shuffle else pos), epoch

    def __call__(self, g: int) -> dict[str, Any]:
        record, epoch = self.record_of(g)
        try:
            return self.process(record, epoch, g)
        except SampleError as e:
            if self.cfg.strict:
                raise
            return {"skip": e.reason, "message": str(e), "index": int(g)}

    def process(self, record: int, epoch: int, g: int = -1) -> dict[str, Any]:
        cfg = self.cfg
        rec = self.source[record]
        where = rec["where"]
        check_record(rec)
        txt = rec["txt"]
        if cfg.filter_no_extra_info and not rec.get("task"):
            raise SampleError("no task", where, "data.filter_no_extra_info drops lines without a task")
        task = normalize_task(rec.get("task"))
        if task not in self.prompts.prompts:
            raise SampleError("unknown task", where, f"{task!r}; known: {self.prompts.tasks}")
        if cfg.remap_style and "<STYLE>" in task:
            txt = remap_style(txt)
        label = normalize_label(txt) if cfg.normalize_text else txt
        target = self.tok.encode(label) + [self.tok.eod_id]
        if not cfg.min_label_tokens <= len(target) <= cfg.max_label_tokens:
            raise SampleError("label length", where, f"{len(target)} tokens, allowed "
                                                     f"{cfg.min_label_tokens}..{cfg.max_label_tokens}")
        prompt_text = self.prompts.choose(task, cfg.seed, epoch if self.train else 0, record)
        prompt = self.tok.encode(prompt_text) if prompt_text else []
        if len(prompt) > cfg.max_prompt_tokens:
            raise SampleError("prompt too long", where, f"{len(prompt)} > data.max_prompt_tokens")
        try:  # the header first: over-long audio is rejected before it is decoded and resampled
            sr, n_head = audio_length(rec["audio"], start=rec.get("start"), end=rec.get("end"))
            if num_frames(n_head, sr) > cfg.max_frames:
                raise SampleError("too long", where, f"{num_frames(n_head, sr)} frames > data.max_frames="
                                                     f"{cfg.max_frames}")
            cut = wav_truncation(rec["audio"])  # also before decoding: libsndfile would read the stump silently
            if cut is not None:
                raise SampleError("truncated audio", where, f"the WAV header promises {cut[0]:.2f} s, the file "
                                                            f"holds {cut[1]:.2f} s")
            wave, sr, n_orig = decode_audio(rec["audio"], start=rec.get("start"), end=rec.get("end"),
                                            target_sr=cfg.sample_rate)
        except AudioError as e:
            raise SampleError("bad audio", where, str(e)) from None
        frames = num_frames(n_orig, sr)
        if frames < cfg.min_frames:
            raise SampleError("too short", where, f"{frames} frames")
        if frames > cfg.max_frames:
            raise SampleError("too long", where, f"{frames} frames > data.max_frames={cfg.max_frames}")
        if len(prompt) + frames / 8 + len(target) > cfg.max_seq_len:
            raise SampleError("sequence too long", where, f"prompt {len(prompt)} + frames/8 {frames / 8:.0f} + "
                                                          f"label {len(target)} > {cfg.max_seq_len}")
        try:
            feats = log_mel_spectrogram(wave, cfg.num_mel_bins, sample_rate=cfg.sample_rate)
        except AudioError as e:
            raise SampleError("bad audio", where, str(e)) from None
        if feats.shape[0] > cfg.frame_buckets[-1]:
            raise SampleError("too long", where, f"{feats.shape[0]} frames > largest bucket")
        if self.train and (cfg.spec_aug or cfg.spec_sub):
            rng = np.random.default_rng([cfg.seed, epoch, record, 1])
            if cfg.spec_aug:
                feats = spec_aug(feats, rng, cfg.spec_aug_num_t_mask, cfg.spec_aug_num_f_mask, cfg.spec_aug_max_t,
                                 cfg.spec_aug_max_f)
            if cfg.spec_sub:
                feats = spec_sub(feats, rng, cfg.spec_sub_num_t_sub, cfg.spec_sub_max_t)
        return {"index": int(g), "record": record, "epoch": epoch, "key": str(rec["key"]), "task": task,
                "feats": feats, "prompt": np.asarray(prompt, np.int32), "target": np.asarray(target, np.int32),
                "seconds": n_orig / sr}


# --------------------------------------------------------------------------------------------------------------
# static-shape batching
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketSpec:
    frame_buckets: tuple[int, ...]
    target_buckets: tuple[int, ...]
    prompt_len: int
    batch_sizes: dict  # (frames, target) -> batch size

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "BucketSpec":
        sizes = {}
        for f in cfg.frame_buckets:
            for t in cfg.target_buckets:
                seq = cfg.max_prompt_tokens + math.ceil(f / 8) + 2 + t
                b = max(1, min(cfg.max_frames_per_batch // f, cfg.max_tokens_per_batch // seq))
                m = max(1, cfg.batch_size_multiple)
                sizes[(f, t)] = max(m, b // m * m)  # divisible by the data-parallel shards
        return cls(tuple(cfg.frame_buckets), tuple(cfg.target_buckets), cfg.max_prompt_tokens, sizes)

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (batch, frames, prompt, target) shape this spec can produce."""
        return [(b, f, self.prompt_len, t) for (f, t), b in self.batch_sizes.items()]

    def bucket_of(self, frames: int, target: int) -> tuple[int, int] | None:
        f = next((b for b in self.frame_buckets if frames <= b), None)
        t = next((b for b in self.target_buckets if target <= b), None)
        return None if f is None or t is None else (f, t)

    def pad(self, examples: list[dict], bucket: tuple[int, int], mel_bins: int) -> dict[str, np.ndarray]:
        f, t = bucket
        b, p = self.batch_sizes[bucket], self.prompt_len
        feats = np.zeros((b, f, mel_bins), np.float32)
        feats_lengths = np.ones(b, np.int32)  # padding rows: one silent frame, no prompt, no target
        prompt = np.full((b, p), PAD_PROMPT, np.int32)
        prompt_lengths = np.zeros(b, np.int32)
        target = np.full((b, t), IGNORE_ID, np.int32)
        target_lengths = np.zeros(b, np.int32)
        keys, tasks, indices = [""] * b, [""] * b, [-1] * b
        for i, ex in enumerate(examples):
            n = ex["feats"].shape[0]
            feats[i, :n] = ex["feats"]
            feats_lengths[i] = n
            prompt[i, :len(ex["prompt"])] = ex["prompt"]
            prompt_lengths[i] = len(ex["prompt"])
            target[i, :len(ex["target"])] = ex["target"]
            target_lengths[i] = len(ex["target"])
            keys[i], tasks[i], indices[i] = ex["key"], ex["task"], int(ex.get("index", -1))
        return {"feats": feats, "feats_lengths": feats_lengths, "prompt": prompt, "prompt_lengths": prompt_lengths,
                "target": target, "target_lengths": target_lengths, "keys": np.asarray(keys),
                "tasks": np.asarray(tasks), "indices": np.asarray(indices, np.int64),
                "num_real": np.int32(len(examples))}


class BucketBatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: BucketSpec, refetch: Callable[[int], dict],
                 mel_bins: int):
        super().__init__(parent)
        self._spec, self._refetch, self._mel_bins = spec, refetch, mel_bins

    def __iter__(self):
        return BucketBatchIterator(self._parent.__iter__(), self._spec, self._refetch, self._mel_bins)

    def __str__(self) -> str:
        return "BucketBatchIterDataset"


class BucketBatchIterator(grain.DatasetIterator):
    """Groups examples into per-bucket buffers and emits padded batches; counts skipped samples by reason."""

    MAX_WARNINGS_PER_REASON = 10

    def __init__(self, parent, spec: BucketSpec, refetch, mel_bins: int):
        super().__init__(parent)
        self._spec, self._refetch, self._mel_bins = spec, refetch, mel_bins
        self._buffers: dict[tuple[int, int], list[dict]] = collections.defaultdict(list)
        self._skipped: collections.Counter = collections.Counter()
        self._exhausted = False

    def _add(self, ex: dict) -> dict | None:
        if "skip" in ex:
            self._skipped[ex["skip"]] += 1
            if self._skipped[ex["skip"]] <= self.MAX_WARNINGS_PER_REASON:
                log.warning("skipping sample: %s", ex["message"])
            return None
        bucket = self._spec.bucket_of(ex["feats"].shape[0], len(ex["target"]))
        if bucket is None:  # filters keep this from happening with a consistent config
            self._skipped["no bucket"] += 1
            return None
        buf = self._buffers[bucket]
        buf.append(ex)
        if len(buf) == self._spec.batch_sizes[bucket]:
            del self._buffers[bucket]
            return self._spec.pad(buf, bucket, self._mel_bins)
        return None

    def __next__(self):
        while not self._exhausted:
            try:
                ex = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            batch = self._add(ex)
            if batch is not None:
                return batch
        if self._buffers:  # end of data: flush partial buckets (padded with empty rows), fixed order
            bucket = min(self._buffers)
            return self._spec.pad(self._buffers.pop(bucket), bucket, self._mel_bins)
        raise StopIteration

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            "buffers": [[list(b), [ex["index"] for ex in exs]] for b, exs in sorted(self._buffers.items())],
            "skipped": dict(self._skipped),
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._buffers = collections.defaultdict(list)
        for bucket, indices in state["buffers"]:
            self._buffers[tuple(bucket)] = [self._refetch(g) for g in indices]
        self._skipped = collections.Counter(state["skipped"])
        self._exhausted = state["exhausted"]


# --------------------------------------------------------------------------------------------------------------
# assembly
# --------------------------------------------------------------------------------------------------------------


class DataPipeline:
    """Builds the Grain dataset for one data list; see the module docstring."""

    def __init__(self, cfg: DataConfig, path: str | None = None, *, train: bool = True, tokenizer: Tokenizer | None = None,
                 prompts: PromptBook | None = None, shard_index: int | None = None, shard_count: int | None = None,
                 progress: bool = False):
        path = path or (cfg.train if train else cfg.dev)
        if not path:
            raise ConfigError("no data path: set data.train (or data.dev)")
        self.cfg, self.path, self.train = cfg, path, train
        # a raw list under data.strict is checked line by line in file order below (_strict_prepass)
        self._lines_first = cfg.strict and (
            cfg.format == "raw" or (cfg.format == "auto" and detect_format(path) == "raw"))
        self.source = open_source(path, cfg.format, cache_dir=cfg.index_cache_dir,
                                  strict=cfg.strict and not self._lines_first, progress=progress)
        if len(self.source) == 0:
            raise ValueError(f"{path}: no usable utterances (index skipped {dict(self.source.index_skips.counts)})")
        if tokenizer is None:
            if not cfg.tokenizer:
                raise ConfigError("data.tokenizer must name a local tokenizer directory")
            tokenizer = Tokenizer(cfg.tokenizer, cfg.eod_token)
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptBook.load(cfg.prompts or None)
        # start-up checks: tasks without prompts (their utterances are skipped as "unknown task"; strict mode
        # refuses the list at the first such line), every prompt of a task the data has fits the static prompt
        # length (a long prompt of a task this data never uses costs nothing)
        self.unknown_tasks = self._unknown_tasks()
        used = {normalize_task(t) for t in self.source.tasks}
        for task, items in self.prompts.prompts.items():
            for p in items if task in used else ():
                n = len(tokenizer.encode(p)) if p != "<no_prompt>" else 0
                if n > cfg.max_prompt_tokens:
                    raise ConfigError(f"prompt for {task!r} has {n} tokens > data.max_prompt_tokens="
                                      f"{cfg.max_prompt_tokens}: {p!r}")
        self.spec = BucketSpec.from_config(cfg)
        if shard_index is None or shard_count is None:
            opts = grain.sharding.ShardByJaxProcess()
            shard_index, shard_count = opts.shard_index, opts.shard_count
        self.shard_index, self.shard_count = shard_index, shard_count
        self.processor = SampleProcessor(cfg, self.source, tokenizer, self.prompts, train=train)

    def _strict_prepass(self, known: set[str]) -> None:
        """``data.strict`` on a raw list: the first line that cannot be used, in file order, among what can be
        told without reading audio (unreadable lines, :func:`check_record`, tasks without prompts). Problems
        with the audio itself are raised when the utterance is processed."""
        src = self.source
        bad = list(src.bad_lines)
        for i in range(len(src)):
            if bad and bad[0][0] < src.line_of(i):
                break
            rec = src[i]
            check_record(rec)
            task = normalize_task(rec.get("task"))
            if task not in known:
                raise self._unknown_task(task, rec["where"])
        if bad:
            n, reason, detail = bad[0]
            raise SampleError(reason, f"{src.path}:{n}", detail)

    def _unknown_task(self, task: str, where: str) -> SampleError:
        return SampleError("unknown task", where, f"{task!r} has no prompts in {self.prompts.source}; known: "
                                                  f"{self.prompts.tasks}")

    def _unknown_tasks(self) -> dict[str, int]:
        """``{task: utterances}`` for the tasks of the data that the prompt file does not know."""
        known = set(self.prompts.prompts)
        counts: collections.Counter = collections.Counter()
        first = None
        for i, t in enumerate(self.source.tasks):
            task = normalize_task(t)
            if task not in known:
                counts[task] += 1
                first = i if first is None else first
        if self._lines_first:
            self._strict_prepass(known)
        if counts and self.cfg.strict:
            raise self._unknown_task(normalize_task(self.source.tasks[first]), self.source[first]["where"])
        if counts:
            log.warning("%s: %d utterance(s) have tasks without prompts in %s and will be skipped: %s",
                        self.path, sum(counts.values()), self.prompts.source, dict(counts))
        return dict(counts)

    @property
    def index_skips(self) -> dict[str, int]:
        return dict(self.source.index_skips.counts)

    def dataset(self) -> grain.IterDataset:
        epochs = (self.cfg.num_epochs or None) if self.train else 1
        ds = grain.MapDataset.range(len(self.source)).repeat(epochs)
        ds = ds[self.shard_index::self.shard_count]
        ds = ds.map(self.processor)
        it = BucketBatchIterDataset(ds.to_iter_dataset(), self.spec, self.processor, self.cfg.num_mel_bins)
        if self.cfg.num_workers > 0:
            import absl.flags  # Grain workers read absl flags; unparsed flags crash them (google/grain#1355)

            if not absl.flags.FLAGS.is_parsed():
                absl.flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=self.cfg.num_workers))
        return it

    def __iter__(self):
        return iter(self.dataset())


def skip_counts(state: Any) -> dict[str, int]:
    """Sum the per-reason skip counts found anywhere in a (possibly multi-worker) iterator state."""
    total: collections.Counter = collections.Counter()

    def walk(x):
        if isinstance(x, dict):
            if "skipped" in x and isinstance(x["skipped"], dict) and "buffers" in x:
                total.update(x["skipped"])
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, (bytes, str)):
            pass

    walk(state)
    return dict(total)
