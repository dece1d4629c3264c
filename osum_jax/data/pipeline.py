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

Static shapes: a batch has ``F`` frames from ``data.frame_buckets`` (by default aligned to the frame budget),
``L`` target tokens from ``data.target_buckets`` and ``P`` prompt tokens (``data.max_prompt_tokens``, or the
longest prompt of the data's tasks); its rows are ``devices x per_device[(F, L)]``. The budgets are per
data-parallel device, and each device's rows are packed by OSUM's rule (:class:`BucketSpec`). So a run has at
most ``len(frame_buckets) * len(target_buckets)`` shapes (24 by default).
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
from osum_torch_infer.formats.prompts import prompt_text

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

    def __init__(self, cfg: DataConfig, source, tokenizer: Tokenizer, prompts: PromptBook, *, train: bool,
                 prompt_len: int | None = None):
        self.cfg, self.source, self.tok, self.prompts, self.train = cfg, source, tokenizer, prompts, train
        self.prompt_len = cfg.max_prompt_tokens if prompt_len is None else prompt_len
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
        if len(prompt) > self.prompt_len:
            raise SampleError("prompt too long", where, f"{len(prompt)} > the static prompt length {self.prompt_len}")
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
        if feats.shape[0] > cfg.resolved_frame_buckets[-1]:
            raise SampleError("too long", where, f"{feats.shape[0]} frames > largest bucket")
        if self.train and (cfg.spec_aug or cfg.spec_sub):
            rng = np.random.default_rng([cfg.seed, epoch, record, 1])
            if cfg.spec_aug:
                feats = spec_aug(feats, rng, cfg.spec_aug_num_t_mask, cfg.spec_aug_num_f_mask, cfg.spec_aug_max_t,
                                 cfg.spec_aug_max_f)
            if cfg.spec_sub:
                feats = spec_sub(feats, rng, cfg.spec_sub_num_t_sub, cfg.spec_sub_max_t)
        if self.train and cfg.feature_noise > 0:
            noise = np.random.default_rng([cfg.seed, epoch, record, 2]).standard_normal(feats.shape)
            feats = (feats + cfg.feature_noise * noise).astype(feats.dtype)
        return {"index": int(g), "record": record, "epoch": epoch, "key": str(rec["key"]), "task": task,
                "feats": feats, "prompt": np.asarray(prompt, np.int32), "target": np.asarray(target, np.int32),
                "seconds": n_orig / sr}


# --------------------------------------------------------------------------------------------------------------
# static-shape batching
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketSpec:
    """Static shapes and OSUM's packing rule, per data-parallel device.

    OSUM (wenet ``dynamic_batch``) packs each GPU's batch on its own: an utterance joins the open batch while
    ``longest_frames * (n + 1) <= max_frames_per_batch`` and ``longest_seq * (n + 1) <= max_tokens_per_batch``,
    ``seq = frames / 8 + label + prompt`` (the longest taken with the newcomer included). Here the same rule
    packs one device's rows inside a ``(frames, target)`` bucket; the rows are then padded to the bucket's
    static per-device batch ``per_device[(F, L)]``: the most rows the rule can ever put in that bucket (its
    shortest possible utterance decides), capped at ``data.max_utts_per_device``. A pipeline batch holds
    ``devices`` such groups, device-major (rows ``d * per_device .. (d + 1) * per_device`` are device d's), so
    ``batch_sizes[(F, L)] = devices * per_device[(F, L)]``.
    """

    frame_buckets: tuple[int, ...]
    target_buckets: tuple[int, ...]
    prompt_len: int
    per_device: dict  # (frames, target) -> rows per device
    devices: int = 1
    max_frames_per_batch: int = 3900
    max_tokens_per_batch: int = 1900
    packing: str = "osum"  # or "fill": a group takes per_device rows, whatever their lengths

    @classmethod
    def from_config(cls, cfg: DataConfig, *, devices: int = 1, prompt_len: int | None = None) -> "BucketSpec":
        """``devices``: the data-parallel devices one batch of this pipeline spans (this process's share of
        ``data x fsdp``); ``prompt_len``: the static prompt length (default ``data.max_prompt_tokens``, which
        the pipeline measures from the prompt book when it is 0)."""
        frames = cfg.resolved_frame_buckets
        p = cfg.max_prompt_tokens if prompt_len is None else prompt_len
        per_device = {}
        for i, f in enumerate(frames):
            lo_f = frames[i - 1] + 1 if i else max(1, cfg.min_frames)
            for j, t in enumerate(cfg.target_buckets):
                lo_t = cfg.target_buckets[j - 1] + 1 if j else max(1, cfg.min_label_tokens)
                if cfg.packing == "fill":  # the budgets on the padded shape, no cap
                    n = min(cfg.max_frames_per_batch // f, cfg.max_tokens_per_batch // (p + math.ceil(f / 8) + 2 + t))
                else:
                    n = min(cfg.max_frames_per_batch // lo_f,
                            math.floor(cfg.max_tokens_per_batch / (lo_f / 8 + lo_t)), cfg.max_utts_per_device)
                per_device[(f, t)] = max(1, n)
        return cls(tuple(frames), tuple(cfg.target_buckets), p, per_device, max(1, devices),
                   cfg.max_frames_per_batch, cfg.max_tokens_per_batch, cfg.packing)

    @property
    def batch_sizes(self) -> dict:
        """``(frames, target) -> rows`` of one pipeline batch (every device's group)."""
        return {k: v * self.devices for k, v in self.per_device.items()}

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (batch, frames, prompt, target) shape this spec can produce."""
        return [(b, f, self.prompt_len, t) for (f, t), b in self.batch_sizes.items()]

    def bucket_of(self, frames: int, target: int) -> tuple[int, int] | None:
        f = next((b for b in self.frame_buckets if frames <= b), None)
        t = next((b for b in self.target_buckets if target <= b), None)
        return None if f is None or t is None else (f, t)

    def fits(self, group: list[dict], ex: dict, bucket: tuple[int, int]) -> bool:
        """OSUM's rule: may ``ex`` join one device's open ``group`` of ``bucket``?"""
        n = len(group) + 1
        if n > self.per_device[bucket]:
            return False
        if self.packing == "fill":
            return True
        longest_frames = max(seq_cost(e)[0] for e in (*group, ex))
        longest_seq = max(seq_cost(e)[1] for e in (*group, ex))
        return longest_frames * n <= self.max_frames_per_batch and longest_seq * n <= self.max_tokens_per_batch

    def pad(self, rows: list, bucket: tuple[int, int], mel_bins: int) -> dict[str, np.ndarray]:
        """A batch of ``bucket`` from ``rows`` (an example or None per row, at most ``batch_sizes[bucket]``;
        missing rows are padding: one silent frame, no prompt, no target, index -1)."""
        f, t = bucket
        b, p = self.batch_sizes[bucket], self.prompt_len
        if len(rows) > b:
            raise ValueError(f"{len(rows)} rows > the bucket's {b}")
        feats = np.zeros((b, f, mel_bins), np.float32)
        feats_lengths = np.ones(b, np.int32)
        prompt = np.full((b, p), PAD_PROMPT, np.int32)
        prompt_lengths = np.zeros(b, np.int32)
        target = np.full((b, t), IGNORE_ID, np.int32)
        target_lengths = np.zeros(b, np.int32)
        keys, tasks, indices = [""] * b, [""] * b, [-1] * b
        for i, ex in enumerate(rows):
            if ex is None:
                continue
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
                "num_real": np.int32(sum(ex is not None for ex in rows))}

    def rows_of(self, bucket: tuple[int, int], groups: list[list]) -> list:
        """Device-major rows of a batch from its per-device ``groups`` (each at most ``per_device`` long)."""
        cap = self.per_device[bucket]
        rows: list = [None] * (cap * len(groups))
        for d, g in enumerate(groups):
            rows[d * cap: d * cap + len(g)] = g
        return rows


def seq_cost(ex: dict) -> tuple[int, float]:
    """``(frames, seq)`` of an example as OSUM's batching counts them: seq = frames / 8 + label + prompt."""
    n = int(ex["feats"].shape[0])
    return n, n / 8 + len(ex["target"]) + len(ex["prompt"])


def real_rows(batch: dict) -> np.ndarray:
    """Boolean ``[B]``: the rows of a pipeline batch that hold an utterance (padding rows have index -1)."""
    if "indices" in batch:
        return np.asarray(batch["indices"]) >= 0
    n = int(batch.get("num_real", len(batch["feats_lengths"])))
    return np.arange(len(batch["feats_lengths"])) < n


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
    """Packs examples per bucket and device by OSUM's rule (:meth:`BucketSpec.fits`) and emits a padded batch
    once ``spec.devices`` groups of a bucket are closed; counts skipped samples by reason.

    A device's open group of a bucket is closed when the next utterance of that bucket would break the rule
    (as OSUM's ``dynamic_batch`` yields its buffer) or when it holds the bucket's static rows."""

    MAX_WARNINGS_PER_REASON = 10

    def __init__(self, parent, spec: BucketSpec, refetch, mel_bins: int):
        super().__init__(parent)
        self._spec, self._refetch, self._mel_bins = spec, refetch, mel_bins
        # bucket -> (closed groups, open group)
        self._buffers: dict[tuple[int, int], tuple[list[list[dict]], list[dict]]] = {}
        self._skipped: collections.Counter = collections.Counter()
        self._exhausted = False

    def _add(self, ex: dict) -> dict | None:
        if "skip" in ex:
            self._skipped[ex["skip"]] += 1
            if self._skipped[ex["skip"]] <= self.MAX_WARNINGS_PER_REASON:
                log.warning("skipping sample: %s", ex["message"])
            return None
        spec = self._spec
        bucket = spec.bucket_of(ex["feats"].shape[0], len(ex["target"]))
        if bucket is None:  # filters keep this from happening with a consistent config
            self._skipped["no bucket"] += 1
            return None
        closed, open_ = self._buffers.setdefault(bucket, ([], []))
        if open_ and not spec.fits(open_, ex, bucket):
            closed.append(list(open_))
            open_.clear()
        open_.append(ex)
        if len(open_) == spec.per_device[bucket]:  # full: no utterance can join it
            closed.append(list(open_))
            open_.clear()
        if len(closed) >= spec.devices:
            groups = closed[:spec.devices]
            del closed[:spec.devices]
            if not closed and not open_:
                del self._buffers[bucket]
            return spec.pad(spec.rows_of(bucket, groups), bucket, self._mel_bins)
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
        if self._buffers:  # end of data: flush what is left (missing groups and rows are padding), fixed order
            bucket = min(self._buffers)
            closed, open_ = self._buffers[bucket]
            groups = closed + ([list(open_)] if open_ else [])
            take, rest = groups[:self._spec.devices], groups[self._spec.devices:]
            if rest:
                self._buffers[bucket] = (rest, [])
            else:
                del self._buffers[bucket]
            return self._spec.pad(self._spec.rows_of(bucket, take), bucket, self._mel_bins)
        raise StopIteration

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            # [bucket, closed groups, open group], as global element numbers (refetched on restore)
            "buffers": [[list(b), [[ex["index"] for ex in g] for g in closed], [ex["index"] for ex in open_]]
                        for b, (closed, open_) in sorted(self._buffers.items())],
            "skipped": dict(self._skipped),
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._buffers = {}
        for entry in state["buffers"]:
            if len(entry) == 2:  # written by an osum-jax without per-device groups: one open group
                bucket, closed, open_ = entry[0], [], entry[1]
            else:
                bucket, closed, open_ = entry
            self._buffers[tuple(bucket)] = ([[self._refetch(g) for g in grp] for grp in closed],
                                            [self._refetch(g) for g in open_])
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
        self.prompt_len = prompt_length(cfg, tokenizer, self.prompts, used)
        self.spec = BucketSpec.from_config(cfg, devices=cfg.devices_per_batch, prompt_len=self.prompt_len)
        if shard_index is None or shard_count is None:
            opts = grain.sharding.ShardByJaxProcess()
            shard_index, shard_count = opts.shard_index, opts.shard_count
        self.shard_index, self.shard_count = shard_index, shard_count
        self.processor = SampleProcessor(cfg, self.source, tokenizer, self.prompts, train=train,
                                         prompt_len=self.prompt_len)

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


def longest_prompt(tokenizer: Tokenizer, prompts: PromptBook, tasks=None) -> tuple[int, str, str]:
    """``(tokens, task, prompt)`` of the longest prompt in ``prompts`` (of ``tasks`` only, when given)."""
    best = (0, "", "")
    for task, items in prompts.prompts.items():
        if tasks is not None and task not in tasks:
            continue
        for p in items:
            n = len(tokenizer.encode(prompt_text(p)))  # <no_prompt>: 0 tokens
            best = max(best, (n, task, p))
    return best


def prompt_length(cfg: DataConfig, tokenizer: Tokenizer, prompts: PromptBook, tasks=None) -> int:
    """The static prompt length of a batch: ``data.max_prompt_tokens``, or when it is 0 the longest prompt of
    the data's tasks with this tokenizer, rounded up to a multiple of 8. A set cap that a prompt of those tasks
    exceeds is refused at start-up, naming the prompt (a long prompt of a task the data never uses costs
    nothing)."""
    n, task, text = longest_prompt(tokenizer, prompts, tasks)
    if not cfg.max_prompt_tokens:
        return _round_prompt(n)
    if n > cfg.max_prompt_tokens:
        raise ConfigError(f"prompt for {task!r} in {prompts.source} has {n} tokens > data.max_prompt_tokens="
                          f"{cfg.max_prompt_tokens} (0 measures it from the prompt book): {text!r}")
    return cfg.max_prompt_tokens


def packing_report(spec: BucketSpec, items) -> dict[str, Any]:
    """Packs ``items`` (``(frames, target tokens, prompt tokens)`` per utterance, in stream order) with the
    pipeline's own batcher and reports, per bucket and overall, the batches, rows and what padding costs:
    ``frame_waste`` = 1 - real / padded encoder frames, ``token_waste`` the same for LLM positions
    (prompt + frames / 8 + 2 + target), ``row_fill`` = utterances / rows. Frames of one batch are those of
    all its devices."""
    examples = [{"index": i, "key": str(i), "task": "", "feats": np.zeros((f, 1), np.float32),
                 "prompt": np.zeros(p, np.int32), "target": np.zeros(t, np.int32)} for i, (f, t, p) in enumerate(items)]
    by_index = {ex["index"]: ex for ex in examples}
    it = BucketBatchIterator(iter(grain.MapDataset.source(examples).to_iter_dataset()), spec,
                             by_index.__getitem__, 1)
    buckets: dict = {}
    for b in it:
        bucket = (int(b["feats"].shape[1]), int(b["target"].shape[1]))
        real = real_rows(b)
        fl, tl, pl = b["feats_lengths"][real], b["target_lengths"][real], b["prompt_lengths"][real]
        r = buckets.setdefault(bucket, dict(batches=0, rows=0, utterances=0, frames=0, padded_frames=0,
                                            tokens=0, padded_tokens=0))
        rows, f, t = b["feats"].shape[0], bucket[0], bucket[1]
        r["batches"] += 1
        r["rows"] += rows
        r["utterances"] += int(real.sum())
        r["frames"] += int(fl.sum())
        r["padded_frames"] += rows * f
        r["tokens"] += int((pl + -(-fl // 8) + 2 + tl).sum())
        r["padded_tokens"] += rows * (spec.prompt_len + -(-f // 8) + 2 + t)
    total = {k: sum(r[k] for r in buckets.values()) for k in ("batches", "rows", "utterances", "frames",
                                                               "padded_frames", "tokens", "padded_tokens")}
    for r in (*buckets.values(), total):
        r["frame_waste"] = 1 - r["frames"] / max(r["padded_frames"], 1)
        r["token_waste"] = 1 - r["tokens"] / max(r["padded_tokens"], 1)
        r["row_fill"] = r["utterances"] / max(r["rows"], 1)
    return {"buckets": {f"{f}x{t}": r for (f, t), r in sorted(buckets.items())}, "total": total,
            "skipped": dict(it._skipped)}


PLAN_PROMPT_TOKENS = 64  # what a plan assumes for data.max_prompt_tokens=0 when it has no tokenizer to measure


def static_prompt_len(cfg: DataConfig) -> int:
    """The prompt length a step is compiled or planned for without a data list: ``data.max_prompt_tokens``, or
    the longest prompt of the prompt book with ``data.tokenizer``, or (no tokenizer set)
    :data:`PLAN_PROMPT_TOKENS`, logged."""
    if cfg.max_prompt_tokens:
        return cfg.max_prompt_tokens
    return _measured_prompt_len(cfg.tokenizer, cfg.eod_token, cfg.prompts)


@functools.lru_cache(maxsize=8)
def _measured_prompt_len(tokenizer: str, eod_token: str, prompts: str) -> int:
    """:func:`static_prompt_len` for ``data.max_prompt_tokens=0``, once per tokenizer and prompt book (a plan asks
    for every candidate config; the tokenizer is loaded and every prompt tokenized once)."""
    if not tokenizer:
        log.warning("data.max_prompt_tokens=0 and no data.tokenizer to measure the prompts with: planning for "
                    "%d prompt tokens", PLAN_PROMPT_TOKENS)
        return PLAN_PROMPT_TOKENS
    return _round_prompt(longest_prompt(Tokenizer(tokenizer, eod_token), PromptBook.load(prompts or None))[0])


def _round_prompt(n: int) -> int:
    """A measured prompt length as a static shape: up to a multiple of 8, at least 8."""
    return max(8, -(-n // 8) * 8)


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
