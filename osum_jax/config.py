"""Typed configuration: dataclasses loaded from YAML with MaxText-style ``key=value`` overrides.

A config file holds only the values that differ from the dataclass defaults (the defaults are OSUM's own
values, so ``configs/osum_full.yaml`` is short). Loading lives in :mod:`osum_jax.config_loading` (which imports this
module, never the reverse). Overrides use dotted paths::

    from osum_jax.config_loading import load_config
    cfg = load_config("configs/tiny.yaml", ["model.llm.num_layers=4", "model.dtype=bfloat16"])

Every key is checked: an unknown key or a value of the wrong type raises ``ConfigError`` naming the key and
the file (or override) it came from.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import yaml
from osum_torch_infer.package import AdapterConfig as _PackageAdapter
from osum_torch_infer.package import EncoderConfig as _PackageEncoder


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


# --------------------------------------------------------------------------------------------------------------
# Model sections
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderConfig(_PackageEncoder):
    """Whisper encoder as OSUM uses it (wenet ``TransformerEncoder``, ``conv1d2`` + ``abs_pos_whisper``).

    The architecture fields are the torch package's (:class:`osum_torch_infer.package.EncoderConfig`: written
    once, in the contract); training adds its dropouts."""

    dropout: float = 0.1  # residual branches and inside the FFN (training only)
    positional_dropout: float = 0.1  # after adding the positional table (training only)


@dataclasses.dataclass(frozen=True)
class AdapterConfig(_PackageAdapter):
    """OSUM's link: 3 causal convs (``GxlConv1dSubsampling4``), a small transformer, a projection to the LLM.

    Architecture fields as :class:`osum_torch_infer.package.AdapterConfig`; training adds its dropouts."""

    dropout: float = 0.1
    positional_dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder (Hugging Face ``Qwen2ForCausalLM`` semantics)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v have biases, o has none
    initializer_range: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """peft-style LoRA on the LLM's projections. ``rank: 0`` disables LoRA."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")

    @property
    def enabled(self) -> bool:
        """The one definition of "this model has LoRA adapters"."""
        return self.rank > 0

    def rank_of(self, name: str) -> int:
        """The adapter rank of projection ``name`` (0: none)."""
        return self.rank if self.enabled and name in self.targets else 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.enabled else 0.0


REMAT_POLICIES = (
    "none",  # keep all activations
    "full",  # recompute everything inside a layer
    "dots_saveable",  # keep matmul outputs
    "dots_with_no_batch_dims_saveable",  # keep weight matmuls, recompute attention scores
    "nothing_saveable",  # same as full
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    # speech_token_emded has speech_token_num + 2 rows; bos = speech_token_num, eos = speech_token_num + 1.
    speech_token_num: int = 4097
    dtype: str = "float32"  # compute dtype: bfloat16 on accelerators, float32 for tests/parity
    param_dtype: str = "float32"
    remat_policy: str = "none"  # per-layer rematerialisation, one of REMAT_POLICIES
    # "auto": splash kernel on TPU, cuDNN flash attention on NVIDIA (bf16/fp16), einsum elsewhere; or one of
    # "xla" (einsum, any backend), "cudnn", "splash" (models/attention.py)
    attention_impl: str = "auto"
    # hand-written forms (models/ops.py: VJPs of GELU/SiLU/LoRA/attention, the heads-major bias gradient and
    # rotate_half as matmuls): "auto" = where they measured faster (CPU, TPU), plain autodiff on GPU; "always";
    # "never"
    custom_vjp: str = "auto"
    # optimization barriers on matmul inputs and output cotangents (models/ops.py): "auto" = TPU, where the
    # compiler's cost model measured them faster; "always"; "never"
    matmul_barrier: str = "auto"
    # layers per iteration of each stack's layer scan (jax.lax.scan's ``unroll``): 1 compiles one layer and loops;
    # 0 unrolls the whole stack (MaxText's ``scan_layers: false``): longer compiles, no loop-carried stacks of
    # saved activations (models/stack.py); "auto" = 0 for training on TPU, where the compiler's cost model measured
    # it faster, 1 elsewhere and for decoding (decode/program.py)
    scan_unroll: int | str = 1

    def validate(self) -> None:
        if self.scan_unroll != "auto" and not (isinstance(self.scan_unroll, int) and self.scan_unroll >= 0):
            raise ConfigError(f"model.scan_unroll={self.scan_unroll!r}; expected auto, 0 (unroll every layer) or "
                              f">= 1")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.custom_vjp not in ("auto", "always", "never"):
            raise ConfigError(f"model.custom_vjp={self.custom_vjp!r}; expected auto, always or never")
        if self.matmul_barrier not in ("auto", "always", "never"):
            raise ConfigError(f"model.matmul_barrier={self.matmul_barrier!r}; expected auto, always or never")
        if self.attention_impl not in ("auto", "xla", "cudnn", "splash", "pallas"):
            raise ConfigError(f"model.attention_impl={self.attention_impl!r}; "
                              "expected auto, xla, cudnn, splash or pallas")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; expected float32, bfloat16 or float16")
        enc, ad, llm, lora = self.encoder, self.adapter, self.llm, self.lora
        if enc.d_model % enc.num_heads:
            raise ConfigError(f"model.encoder.d_model={enc.d_model} not divisible by num_heads={enc.num_heads}")
        if enc.d_model % 2:
            raise ConfigError("model.encoder.d_model must be even (sinusoidal positions)")
        if enc.d_model % ad.num_heads:
            raise ConfigError(f"encoder d_model {enc.d_model} not divisible by model.adapter.num_heads={ad.num_heads}")
        if ad.activation not in ("relu", "gelu", "silu"):
            raise ConfigError(f"model.adapter.activation={ad.activation!r}; expected relu, gelu or silu")
        if any(s < 1 for s in ad.conv_strides) or ad.conv_kernel < 1:
            raise ConfigError("model.adapter conv strides and kernel must be >= 1")
        if llm.num_heads % llm.num_kv_heads:
            raise ConfigError(f"model.llm.num_heads={llm.num_heads} not divisible by num_kv_heads={llm.num_kv_heads}")
        if llm.resolved_head_dim % 2:
            raise ConfigError("model.llm head_dim must be even (rotary embeddings)")
        bad = [t for t in lora.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"model.lora.targets has unknown modules {bad}; known: {LORA_TARGETS}")
        if lora.rank < 0:
            raise ConfigError("model.lora.rank must be >= 0")
        if self.speech_token_num < 1:
            raise ConfigError("model.speech_token_num must be >= 1 (bos/eos rows live above it)")


# model settings that do not change the weights: a run resumes, and checkpoints average, across other values
RUNTIME_MODEL_KEYS = ("model.dtype", "model.remat_policy", "model.custom_vjp", "model.attention_impl",
                      "model.matmul_barrier", "model.scan_unroll")


# --------------------------------------------------------------------------------------------------------------
# Data section
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The Grain input pipeline (``osum_jax.data``). Defaults are OSUM's training values (reference §6)."""

    # A data.list (jsonl), a shard list (one tar path per line), or OSUM's data-config YAML {name: {path, weight}}.
    train: str = ""
    dev: str = ""
    format: str = "auto"  # auto | raw | shard | mix
    tokenizer: str = ""  # local Hugging Face tokenizer directory (tokenizer.json)
    prompts: str = ""  # OSUM prompt_config.yaml format; "" = the shipped default prompts
    eod_token: str = "<|endoftext|>"  # appended to every label (Qwen2: id 151643)
    normalize_text: bool = True  # OSUM's process_text: CJK spaces, lowercase, no spaces around < >
    remap_style: bool = True  # OSUM's processor: raw <STYLE> tags -> its 8 classes, for tasks with <STYLE>
    filter_no_extra_info: bool = False  # OSUM's filter option (true in its training config): drop lines without a task
    index_cache_dir: str = ""  # where tar/list indexes are cached; "" = beside the data, else ~/.cache/osum_jax
    # audio and features
    sample_rate: int = 16000
    num_mel_bins: int = 80
    # filters (frames are 10 ms, counted before resampling as OSUM does)
    min_frames: int = 10  # 0.1 s, OSUM's inference filter (min_length 10); shorter clips carry no speech
    max_frames: int = 2900
    min_label_tokens: int = 1
    max_label_tokens: int = 200  # including the end-of-text id
    max_seq_len: int = 1000  # prompt + frames / 8 + label
    # augmentation (training only)
    spec_aug: bool = True
    spec_aug_num_t_mask: int = 2
    spec_aug_max_t: int = 50
    spec_aug_num_f_mask: int = 2
    spec_aug_max_f: int = 10
    spec_sub: bool = True
    spec_sub_num_t_sub: int = 3
    spec_sub_max_t: int = 30
    # Gaussian noise of this standard deviation added to the training features (seeded per record and epoch);
    # 0 = none. A robustness probe: scripts/bench_demo.py checks that 1e-6 moves the demo's result by little
    feature_noise: float = 0.0
    # static-shape batching (docs/data.md "Batches"): the budgets are per data-parallel device, as OSUM's are
    # per GPU; each device's rows are packed by OSUM's rule (longest x (n + 1) <= budget, frames and
    # seq = frames / 8 + label + prompt), then padded to the bucket's static rows
    frame_buckets: tuple[int, ...] = ()  # () = aligned to the budget: max_frames_per_batch // n for n utterances
    target_buckets: tuple[int, ...] = (48, 96, 200)
    max_prompt_tokens: int = 0  # static prompt length; 0 = the longest prompt of the data's tasks, tokenized
    max_frames_per_batch: int = 3900  # per device (OSUM: max_frames_in_batch, per GPU)
    max_tokens_per_batch: int = 1900  # per device (OSUM: max_seq_in_batch, per GPU)
    max_utts_per_device: int = 8  # rows per device at most (OSUM's rule alone would pack up to ~36 1 s clips)
    # osum: each device's rows packed by OSUM's rule, padded to the bucket's static rows (the most the rule can
    # put there); fill: every batch of a bucket has min(budget // F, tokens // padded sequence) rows, the budgets
    # applied to the padded shape (osum-jax before per-device packing; configs/demo.yaml keeps it)
    packing: str = "osum"
    # order, scale, resume
    seed: int = 777
    shuffle: bool = True
    num_epochs: int = 0  # 0 = repeat forever
    num_workers: int = 0  # Grain worker processes (0 = in-process)
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    devices_per_batch: int = 1  # data-parallel devices one pipeline batch spans (the trainer sets it)

    # written by osum-jax before per-device budgets (the trainer's setting; the run's config.yaml keeps it)
    RETIRED_KEYS: typing.ClassVar[tuple[str, ...]] = ("batch_size_multiple",)

    @property
    def resolved_frame_buckets(self) -> tuple[int, ...]:
        """``frame_buckets``, or the budget-aligned default: ``min(max_frames, max_frames_per_batch // n)`` for
        n = 1..8 utterances, then n growing by about a quarter up to ``max_utts_per_device``. A bucket of
        ``budget // n`` frames holds exactly the utterances OSUM's rule packs n to a batch, so its static rows
        are n and its padded frames stay within the budget."""
        if self.frame_buckets:
            return tuple(self.frame_buckets)
        counts, n = [], 1
        while n < max(1, self.max_utts_per_device):
            counts.append(n)
            n = n + 1 if n < 8 else math.ceil(n * 1.25)
        counts.append(max(1, self.max_utts_per_device))
        frames = {min(self.max_frames, self.max_frames_per_batch // n) for n in counts} | {self.max_frames}
        return tuple(sorted(f for f in frames if f >= 1))

    def validate(self) -> None:
        if self.format not in ("auto", "raw", "shard", "mix"):
            raise ConfigError(f"data.format={self.format!r}; expected auto, raw, shard or mix")
        for name in ("frame_buckets", "target_buckets"):
            b = self.resolved_frame_buckets if name == "frame_buckets" else self.target_buckets
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise ConfigError(f"data.{name}={list(b)} must be a non-empty strictly increasing list of positive ints")
        if self.resolved_frame_buckets[-1] < self.max_frames:
            raise ConfigError(f"data.frame_buckets ends at {self.resolved_frame_buckets[-1]} < "
                              f"data.max_frames={self.max_frames}")
        for name in ("max_frames_per_batch", "max_tokens_per_batch", "max_utts_per_device"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.packing not in ("osum", "fill"):
            raise ConfigError(f"data.packing={self.packing!r}; expected osum or fill")
        if self.max_prompt_tokens < 0:
            raise ConfigError("data.max_prompt_tokens must be >= 0 (0 = measured from the prompt book)")
        if self.target_buckets[-1] < self.max_label_tokens:
            raise ConfigError(f"data.target_buckets ends at {self.target_buckets[-1]} < "
                              f"data.max_label_tokens={self.max_label_tokens}")
        if self.num_workers < 0 or self.num_epochs < 0:
            raise ConfigError("data.num_workers and data.num_epochs must be >= 0")
        if not (self.feature_noise >= 0 and math.isfinite(self.feature_noise)):
            raise ConfigError(f"data.feature_noise={self.feature_noise} must be a finite number >= 0")


# --------------------------------------------------------------------------------------------------------------
# Training section
# --------------------------------------------------------------------------------------------------------------

FIRE_MODULES = ("link", "encoder", "llm", "link_and_encoder", "link_and_encoder_and_lora", "lora", "all")
SCHEDULES = ("warmup_inverse_sqrt", "cosine", "constant")
INIT_PARTS = ("encoder", "adapter", "speech_embed", "llm")  # OSUM's top-level modules (llm includes its LoRA)

# MaxText-style logical-axis -> mesh-axis rules (None = replicated). First matching mesh axis wins.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("embed_in", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("mel", None),
    ("conv_width", None),
    ("speech_vocab", None),
    ("lora_rank", None),
    ("norm", None),
    ("positions", None),
)


# Activations (``osum_jax.models.sharding``): a name may be listed for several mesh axes, which then all split it.
DEFAULT_ACTIVATION_RULES: tuple[tuple[str, str | None], ...] = (
    ("act_batch", "data"),
    ("act_batch", "fsdp"),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)``; -1 fills the remaining devices. Batches shard over data x fsdp.

    ``rules`` map the logical axes of the parameters to mesh axes; ``frozen_rules`` override them for the
    frozen parameters (for the names they list), e.g. ``[[embed, null]]`` keeps a bf16 frozen LLM whole on every
    device (no per-step all-gathers) while the trainable parameters and their optimizer state stay sharded.
    ``activation_rules`` pin activations (``act_*`` names)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # slices joined by the data-centre network (multi-slice TPU): data/fsdp/tensor are then per slice and the
    # data axis spans the slices (MaxText's dcn_data_parallelism); 1 = one slice
    dcn_data: int = 1
    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES
    frozen_rules: tuple[tuple[str, str | None], ...] = ()  # overrides of rules for frozen parameters
    activation_rules: tuple[tuple[str, str | None], ...] = DEFAULT_ACTIVATION_RULES


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host set-up for ``jax.distributed.initialize``; empty values are read from the environment
    (``OSUM_COORDINATOR``, ``OSUM_NUM_PROCESSES``, ``OSUM_PROCESS_ID``) or left to JAX's auto-detection."""

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    auto: bool = True  # without the above: initialise when SLURM / Open MPI / a multi-host TPU slice says so


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``osum-train``: OSUM's optimisation defaults (reference §7)."""

    output_dir: str = "runs/osum"
    init_from: str = ""  # a checkpoint written by osum-convert (weights only) to start from
    # which of the model's parts init_from gives (INIT_PARTS; () = all); the others start from the run's own
    # random initialisation (train.seed), e.g. [encoder, adapter] keeps a pretrained front end and a fresh LLM
    init_parts: tuple[str, ...] = ()
    resume_data: bool = True  # on resume, continue the data order exactly (needs the same processes/workers)
    fire_module: str = "link_and_encoder_and_lora"  # what trains; see FIRE_MODULES
    frozen_param_dtype: str = "float32"  # bfloat16 halves the memory of frozen weights
    steps: int = 100_000  # optimizer steps (each = grad_accum micro-batches)
    # stop before train.steps once the mean training loss of the last stop_window optimizer steps is below this
    # (0 = never): a stage trained until it has learned something, not for a fixed count (the demo's listening
    # stage); the step is checkpointed and the run ends as at its last step
    stop_below_loss: float = 0.0
    stop_window: int = 20
    learning_rate: float = 5e-5
    schedule: str = "warmup_inverse_sqrt"
    warmup_steps: int = 8000
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    grad_accum: int = 4
    seed: int = 777
    log_every: int = 10
    checkpoint_every: int = 1250
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_every: int = 0  # 0 = no evaluation during training
    eval_batches: int = 8  # held-out loss over this many dev batches
    eval_decode_batches: int = 2  # greedy-decode this many dev batches for WER/CER/tag accuracy
    eval_max_new_tokens: int = 64
    progress: bool = True
    # persistent XLA compilation cache (shared by restarts and re-runs; "" = off, or JAX_COMPILATION_CACHE_DIR)
    compilation_cache_dir: str = ""
    # PRNG of the dropout masks: threefry2x32 (JAX's default, bit-reproducible everywhere), hash (threefry keys,
    # masks from a counter hash: one MurmurHash3 finaliser per 32 bits instead of threefry's 20 rounds; 4-layer
    # v5p proxy 89.2 -> 86.8 ms) or rbg / unsafe_rbg (XLA's RngBitGenerator; not partitioned by XLA, every chip
    # draws the global batch's bits: docs/training.md)
    dropout_rng: str = "threefry2x32"
    peak_tflops_per_device: float = 0.0  # for MFU (e.g. 989 for H100 bf16 dense); 0 = not reported
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if self.fire_module not in FIRE_MODULES:
            raise ConfigError(f"train.fire_module={self.fire_module!r}; expected one of {FIRE_MODULES}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        bad = [p for p in self.init_parts if p not in INIT_PARTS]
        if bad or len(set(self.init_parts)) != len(self.init_parts):
            raise ConfigError(f"train.init_parts={list(self.init_parts)}; expected distinct names from "
                              f"{list(INIT_PARTS)} ([] = all)")
        if self.init_parts and not self.init_from:
            raise ConfigError(f"train.init_parts={list(self.init_parts)} without train.init_from: there is nothing "
                              "to take them from")
        if self.dropout_rng not in ("threefry2x32", "hash", "rbg", "unsafe_rbg"):
            raise ConfigError(f"train.dropout_rng={self.dropout_rng!r}; expected threefry2x32, hash, rbg or "
                              "unsafe_rbg")
        if self.frozen_param_dtype not in ("float32", "bfloat16"):
            raise ConfigError("train.frozen_param_dtype must be float32 or bfloat16")
        if not (math.isfinite(self.stop_below_loss) and self.stop_below_loss >= 0):
            raise ConfigError(f"train.stop_below_loss={self.stop_below_loss}; use a loss > 0, or 0 (never stop early)")
        if self.stop_window < 1:
            raise ConfigError(f"train.stop_window={self.stop_window}; must be >= 1 (optimizer steps averaged)")
        if self.grad_accum < 1 or self.steps < 1:
            raise ConfigError("train.grad_accum and train.steps must be >= 1")
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}; must be >= 1 (a checkpoint is also written "
                                  "at the last step)")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every={self.eval_every}; use 0 (no evaluation) or a positive interval")
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self.mesh, name)
            if v == 0 or v < -1:
                raise ConfigError(f"train.mesh.{name}={v}; use a positive size or -1 (fill)")
        if self.mesh.dcn_data < 1:
            raise ConfigError(f"train.mesh.dcn_data={self.mesh.dcn_data}; use the number of slices (>= 1)")
        if sum(getattr(self.mesh, n) == -1 for n in ("data", "fsdp", "tensor")) > 1:
            raise ConfigError("train.mesh: at most one axis may be -1")
        for name in ("rules", "frozen_rules", "activation_rules"):
            for rule in getattr(self.mesh, name):
                if len(rule) != 2 or rule[1] not in (None, "data", "fsdp", "tensor"):
                    raise ConfigError(f"train.mesh.{name} entry {list(rule)} must be "
                                      f"[logical_name, data|fsdp|tensor|null]")


@dataclasses.dataclass(frozen=True)
class Config:
    """Top-level config: ``model``, ``data``, ``train`` sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.data.num_mel_bins != self.model.encoder.num_mel_bins:
            raise ConfigError(f"data.num_mel_bins={self.data.num_mel_bins} != "
                              f"model.encoder.num_mel_bins={self.model.encoder.num_mel_bins}")
        if self.data.resolved_frame_buckets[-1] > 2 * self.model.encoder.max_source_positions:
            raise ConfigError(f"data.frame_buckets go up to {self.data.resolved_frame_buckets[-1]} frames; the encoder "
                              f"accepts at most {2 * self.model.encoder.max_source_positions}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj

