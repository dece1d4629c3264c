"""Rule table between the official OSUM flat state dict (``infer.pt``) and the JAX ``OSUM`` model.

OSUM's keys (reference §1.1, §2, §4) use wenet names for the Whisper encoder and the adapter and peft names
for the LLM. :data:`OSUM` is the table, one literal :class:`~osum_jax.convert.rules.Rule` row per tensor in
OSUM's state-dict order (the LLM's keys in their plain HF form under ``llama_model.``; :func:`peft_key` and
:func:`normalize_osum_key` convert to and from OSUM's peft names). :func:`osum_table` selects the rows of a config
and expands them to one :class:`~osum_jax.convert.rules.Entry` per torch key. The transforms (:mod:`.rules`) are
exact (a transpose or reshape), so values are bit-identical both ways.

Keys that have no place in the model (reference §4):

* ``ln_speech.*``, ``speaker_head.*``: defined but unused by OSUM's forward. Kept verbatim as *extras*.
* ``embed_tokens.weight``, ``lm_head.weight``: aliases of the LLM's tensors (same storage in the file); checked
  to be identical at import and re-created as aliases at export.

Both peft naming styles are read: ``q_proj.base_layer.weight`` + ``q_proj.lora_A.default.weight`` (peft >= 0.7)
and plain ``q_proj.weight`` (+ ``lora_A.weight`` / ``lora_A.<adapter>.weight``); see
:func:`osum_jax.convert.hf.normalize_peft_key`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from ..checkpoint.tree import CheckpointMismatch
from ..config import ModelConfig
from .hf import normalize_peft_key
from .rules import CONV, IDENTITY, LINEAR, PE, Entry, Rule, expand, group, model_flags, model_stacks, select

LLM_PREFIX = "llama_model.base_model.model."
IGNORED = (r"ln_speech\..*", r"speaker_head\..*")  # kept as extras, not model variables
ALIASES = {  # alias key -> the key it duplicates
    "embed_tokens.weight": LLM_PREFIX + "model.embed_tokens.weight",
    "lm_head.weight": LLM_PREFIX + "lm_head.weight",
}


# -- the table --------------------------------------------------------------------------------------------------

# (JAX path in ``OSUM``, OSUM key, transform[, when]), in OSUM's state-dict order; ``{i}``: a layer of a stack
OSUM = [
    Rule("encoder.conv1.kernel",                                  "encoder.embed.conv.0.weight",                                  CONV),
    Rule("encoder.conv1.bias",                                    "encoder.embed.conv.0.bias",                                    IDENTITY),
    Rule("encoder.conv2.kernel",                                  "encoder.embed.conv.2.weight",                                  CONV),
    Rule("encoder.conv2.bias",                                    "encoder.embed.conv.2.bias",                                    IDENTITY),
    Rule("encoder.embed_positions",                               "encoder.embed.pos_enc.pe",                                     PE),
    Rule("encoder.layers.self_attn.q_proj.kernel",                "encoder.encoders.{i}.self_attn.linear_q.weight",               LINEAR),
    Rule("encoder.layers.self_attn.q_proj.bias",                  "encoder.encoders.{i}.self_attn.linear_q.bias",                 IDENTITY),
    Rule("encoder.layers.self_attn.k_proj.kernel",                "encoder.encoders.{i}.self_attn.linear_k.weight",               LINEAR),
    Rule("encoder.layers.self_attn.k_proj.bias",                  "encoder.encoders.{i}.self_attn.linear_k.bias",                 IDENTITY, "key_bias"),
    Rule("encoder.layers.self_attn.v_proj.kernel",                "encoder.encoders.{i}.self_attn.linear_v.weight",               LINEAR),
    Rule("encoder.layers.self_attn.v_proj.bias",                  "encoder.encoders.{i}.self_attn.linear_v.bias",                 IDENTITY),
    Rule("encoder.layers.self_attn.out_proj.kernel",              "encoder.encoders.{i}.self_attn.linear_out.weight",             LINEAR),
    Rule("encoder.layers.self_attn.out_proj.bias",                "encoder.encoders.{i}.self_attn.linear_out.bias",               IDENTITY),
    Rule("encoder.layers.fc1.kernel",                             "encoder.encoders.{i}.feed_forward.w_1.weight",                 LINEAR),
    Rule("encoder.layers.fc1.bias",                               "encoder.encoders.{i}.feed_forward.w_1.bias",                   IDENTITY),
    Rule("encoder.layers.fc2.kernel",                             "encoder.encoders.{i}.feed_forward.w_2.weight",                 LINEAR),
    Rule("encoder.layers.fc2.bias",                               "encoder.encoders.{i}.feed_forward.w_2.bias",                   IDENTITY),
    Rule("encoder.layers.self_attn_layer_norm.scale",             "encoder.encoders.{i}.norm1.weight",                            IDENTITY),
    Rule("encoder.layers.self_attn_layer_norm.bias",              "encoder.encoders.{i}.norm1.bias",                              IDENTITY),
    Rule("encoder.layers.final_layer_norm.scale",                 "encoder.encoders.{i}.norm2.weight",                            IDENTITY),
    Rule("encoder.layers.final_layer_norm.bias",                  "encoder.encoders.{i}.norm2.bias",                              IDENTITY),
    Rule("encoder.layer_norm.scale",                              "encoder.after_norm.weight",                                    IDENTITY),
    Rule("encoder.layer_norm.bias",                               "encoder.after_norm.bias",                                      IDENTITY),
    Rule("adapter.transformer.input_proj.kernel",                 "speech_transformer.embed.out.0.weight",                        LINEAR),
    Rule("adapter.transformer.input_proj.bias",                   "speech_transformer.embed.out.0.bias",                          IDENTITY),
    Rule("adapter.transformer.input_norm.scale",                  "speech_transformer.embed.out.1.weight",                        IDENTITY),
    Rule("adapter.transformer.input_norm.bias",                   "speech_transformer.embed.out.1.bias",                          IDENTITY),
    Rule("adapter.transformer.pos_table",                         "speech_transformer.embed.pos_enc.pe",                          PE),
    Rule("adapter.transformer.layers.self_attn.q_proj.kernel",    "speech_transformer.encoders.{i}.self_attn.linear_q.weight",    LINEAR),
    Rule("adapter.transformer.layers.self_attn.q_proj.bias",      "speech_transformer.encoders.{i}.self_attn.linear_q.bias",      IDENTITY),
    Rule("adapter.transformer.layers.self_attn.k_proj.kernel",    "speech_transformer.encoders.{i}.self_attn.linear_k.weight",    LINEAR),
    Rule("adapter.transformer.layers.self_attn.k_proj.bias",      "speech_transformer.encoders.{i}.self_attn.linear_k.bias",      IDENTITY),
    Rule("adapter.transformer.layers.self_attn.v_proj.kernel",    "speech_transformer.encoders.{i}.self_attn.linear_v.weight",    LINEAR),
    Rule("adapter.transformer.layers.self_attn.v_proj.bias",      "speech_transformer.encoders.{i}.self_attn.linear_v.bias",      IDENTITY),
    Rule("adapter.transformer.layers.self_attn.out_proj.kernel",  "speech_transformer.encoders.{i}.self_attn.linear_out.weight",  LINEAR),
    Rule("adapter.transformer.layers.self_attn.out_proj.bias",    "speech_transformer.encoders.{i}.self_attn.linear_out.bias",    IDENTITY),
    Rule("adapter.transformer.layers.fc1.kernel",                 "speech_transformer.encoders.{i}.feed_forward.w_1.weight",      LINEAR),
    Rule("adapter.transformer.layers.fc1.bias",                   "speech_transformer.encoders.{i}.feed_forward.w_1.bias",        IDENTITY),
    Rule("adapter.transformer.layers.fc2.kernel",                 "speech_transformer.encoders.{i}.feed_forward.w_2.weight",      LINEAR),
    Rule("adapter.transformer.layers.fc2.bias",                   "speech_transformer.encoders.{i}.feed_forward.w_2.bias",        IDENTITY),
    Rule("adapter.transformer.layers.self_attn_layer_norm.scale", "speech_transformer.encoders.{i}.norm1.weight",                 IDENTITY),
    Rule("adapter.transformer.layers.self_attn_layer_norm.bias",  "speech_transformer.encoders.{i}.norm1.bias",                   IDENTITY),
    Rule("adapter.transformer.layers.final_layer_norm.scale",     "speech_transformer.encoders.{i}.norm2.weight",                 IDENTITY),
    Rule("adapter.transformer.layers.final_layer_norm.bias",      "speech_transformer.encoders.{i}.norm2.bias",                   IDENTITY),
    Rule("adapter.transformer.layer_norm.scale",                  "speech_transformer.after_norm.weight",                         IDENTITY),
    Rule("adapter.transformer.layer_norm.bias",                   "speech_transformer.after_norm.bias",                           IDENTITY),
    Rule("llm.embed_tokens",                                      "llama_model.model.embed_tokens.weight",                        IDENTITY),
    Rule("llm.layers.self_attn.q_proj.kernel",                    "llama_model.model.layers.{i}.self_attn.q_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.q_proj.bias",                      "llama_model.model.layers.{i}.self_attn.q_proj.bias",           IDENTITY, "attention_bias"),
    Rule("llm.layers.self_attn.q_proj.lora_a",                    "llama_model.model.layers.{i}.self_attn.q_proj.lora_A.weight",  LINEAR, "lora:q_proj"),
    Rule("llm.layers.self_attn.q_proj.lora_b",                    "llama_model.model.layers.{i}.self_attn.q_proj.lora_B.weight",  LINEAR, "lora:q_proj"),
    Rule("llm.layers.self_attn.k_proj.kernel",                    "llama_model.model.layers.{i}.self_attn.k_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.k_proj.bias",                      "llama_model.model.layers.{i}.self_attn.k_proj.bias",           IDENTITY, "attention_bias"),
    Rule("llm.layers.self_attn.k_proj.lora_a",                    "llama_model.model.layers.{i}.self_attn.k_proj.lora_A.weight",  LINEAR, "lora:k_proj"),
    Rule("llm.layers.self_attn.k_proj.lora_b",                    "llama_model.model.layers.{i}.self_attn.k_proj.lora_B.weight",  LINEAR, "lora:k_proj"),
    Rule("llm.layers.self_attn.v_proj.kernel",                    "llama_model.model.layers.{i}.self_attn.v_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.v_proj.bias",                      "llama_model.model.layers.{i}.self_attn.v_proj.bias",           IDENTITY, "attention_bias"),
    Rule("llm.layers.self_attn.v_proj.lora_a",                    "llama_model.model.layers.{i}.self_attn.v_proj.lora_A.weight",  LINEAR, "lora:v_proj"),
    Rule("llm.layers.self_attn.v_proj.lora_b",                    "llama_model.model.layers.{i}.self_attn.v_proj.lora_B.weight",  LINEAR, "lora:v_proj"),
    Rule("llm.layers.self_attn.o_proj.kernel",                    "llama_model.model.layers.{i}.self_attn.o_proj.weight",         LINEAR),
    Rule("llm.layers.self_attn.o_proj.lora_a",                    "llama_model.model.layers.{i}.self_attn.o_proj.lora_A.weight",  LINEAR, "lora:o_proj"),
    Rule("llm.layers.self_attn.o_proj.lora_b",                    "llama_model.model.layers.{i}.self_attn.o_proj.lora_B.weight",  LINEAR, "lora:o_proj"),
    Rule("llm.layers.mlp.gate_proj.kernel",                       "llama_model.model.layers.{i}.mlp.gate_proj.weight",            LINEAR),
    Rule("llm.layers.mlp.gate_proj.lora_a",                       "llama_model.model.layers.{i}.mlp.gate_proj.lora_A.weight",     LINEAR, "lora:gate_proj"),
    Rule("llm.layers.mlp.gate_proj.lora_b",                       "llama_model.model.layers.{i}.mlp.gate_proj.lora_B.weight",     LINEAR, "lora:gate_proj"),
    Rule("llm.layers.mlp.up_proj.kernel",                         "llama_model.model.layers.{i}.mlp.up_proj.weight",              LINEAR),
    Rule("llm.layers.mlp.up_proj.lora_a",                         "llama_model.model.layers.{i}.mlp.up_proj.lora_A.weight",       LINEAR, "lora:up_proj"),
    Rule("llm.layers.mlp.up_proj.lora_b",                         "llama_model.model.layers.{i}.mlp.up_proj.lora_B.weight",       LINEAR, "lora:up_proj"),
    Rule("llm.layers.mlp.down_proj.kernel",                       "llama_model.model.layers.{i}.mlp.down_proj.weight",            LINEAR),
    Rule("llm.layers.mlp.down_proj.lora_a",                       "llama_model.model.layers.{i}.mlp.down_proj.lora_A.weight",     LINEAR, "lora:down_proj"),
    Rule("llm.layers.mlp.down_proj.lora_b",                       "llama_model.model.layers.{i}.mlp.down_proj.lora_B.weight",     LINEAR, "lora:down_proj"),
    Rule("llm.layers.input_layernorm.scale",                      "llama_model.model.layers.{i}.input_layernorm.weight",          IDENTITY),
    Rule("llm.layers.post_attention_layernorm.scale",             "llama_model.model.layers.{i}.post_attention_layernorm.weight", IDENTITY),
    Rule("llm.norm.scale",                                        "llama_model.model.norm.weight",                                IDENTITY),
    Rule("llm.lm_head",                                           "llama_model.lm_head.weight",                                   LINEAR, "untied"),
    Rule("adapter.downsample.convs.0.kernel",                     "down_sample_2.conv.1.weight",                                  CONV, "conv0"),
    Rule("adapter.downsample.convs.0.bias",                       "down_sample_2.conv.1.bias",                                    IDENTITY, "conv0"),
    Rule("adapter.downsample.convs.1.kernel",                     "down_sample_2.conv.4.weight",                                  CONV, "conv1"),
    Rule("adapter.downsample.convs.1.bias",                       "down_sample_2.conv.4.bias",                                    IDENTITY, "conv1"),
    Rule("adapter.downsample.convs.2.kernel",                     "down_sample_2.conv.7.weight",                                  CONV, "conv2"),
    Rule("adapter.downsample.convs.2.bias",                       "down_sample_2.conv.7.bias",                                    IDENTITY, "conv2"),
    Rule("adapter.proj.kernel",                                   "speech_llama_proj.weight",                                     LINEAR),
    Rule("adapter.proj.bias",                                     "speech_llama_proj.bias",                                       IDENTITY),
    Rule("speech_embed",                                          "speech_token_emded.weight",                                    IDENTITY),
]


def osum_rules(cfg: ModelConfig) -> list[Rule]:
    """The rows of :data:`OSUM` that ``OSUM(cfg)`` has, in OSUM's state-dict order."""
    return select(OSUM, model_flags(cfg), table="OSUM")


def osum_table(cfg: ModelConfig) -> list[Entry]:
    """Every model variable of ``OSUM(cfg)`` with its OSUM key(s), in OSUM's state-dict order."""
    return expand(osum_rules(cfg), model_stacks(cfg))


def normalize_osum_key(key: str) -> str:
    """OSUM key -> the table's key: the LLM's peft names are reduced to plain HF names under ``llama_model.``."""
    if key.startswith(LLM_PREFIX):
        return "llama_model." + normalize_peft_key("base_model.model." + key[len(LLM_PREFIX):])
    return key


def peft_key(table_key: str, lora_targets: Sequence[str], style: str = "base_layer") -> str:
    """The table's key -> OSUM's key. ``style='base_layer'`` (peft >= 0.7, OSUM's release) or ``'plain'``."""
    if not table_key.startswith("llama_model."):
        return table_key
    rest = table_key[len("llama_model."):]
    m = re.fullmatch(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.(weight|bias|lora_A\.weight|lora_B\.weight)",
                     rest)
    if m and m.group(2) in lora_targets:
        module, leaf = m.group(1), m.group(3)
        if leaf.startswith("lora_"):
            rest = f"{module}.{leaf.split('.')[0]}.default.weight"
        elif style == "base_layer":
            rest = f"{module}.base_layer.{leaf}"
    return LLM_PREFIX + rest


def canonical_keys(cfg: ModelConfig) -> list[str]:
    """OSUM's full key list in its state-dict order (module registration order, reference §4)."""
    targets = cfg.lora.targets if cfg.lora.enabled else ()
    table = [peft_key(e.torch_key, targets) for e in osum_table(cfg)]
    order = ["encoder.", "ln_speech.", "speech_transformer.", LLM_PREFIX, "down_sample_2.", "speech_llama_proj.",
             "embed_tokens.", "lm_head.", "speech_token_emded.", "speaker_head."]
    keys = table + ["ln_speech.weight", "ln_speech.bias", "speaker_head.weight", "speaker_head.bias"]
    keys += [a for a in ALIASES if not (a == "lm_head.weight" and cfg.llm.tie_word_embeddings)]
    rank = {k: i for i, k in enumerate(keys)}
    return sorted(keys, key=lambda k: (next(i for i, p in enumerate(order) if k.startswith(p)), rank[k]))


def extra_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of OSUM's unused tensors for ``cfg`` (``ln_speech`` over the encoder width, ``speaker_head``)."""
    d, h = cfg.encoder.d_model, cfg.llm.hidden_size
    return {"ln_speech.weight": (d,), "ln_speech.bias": (d,),
            "speaker_head.weight": (cfg.speech_token_num, h), "speaker_head.bias": (cfg.speech_token_num,)}


# -- import plan --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """How a source state dict maps onto the model: checked completely before any data is read."""

    leaves: dict[str, list[tuple[str, Entry]]]  # jax path -> [(source key, entry)] in layer order
    shapes: dict[str, tuple[int, ...]]  # jax path -> JAX shape
    dtypes: dict[str, str]  # jax path -> dtype name (as stored in the source)
    extras: list[str]  # source keys kept verbatim
    aliases: dict[str, str]  # alias source key -> source key it must equal
    layout: list[dict]  # every source key in source order: {key, dtype, shape, role[, of]}


def plan_import(meta: Mapping[str, tuple[tuple[int, ...], str]], cfg: ModelConfig,
                model_shapes: Mapping[str, tuple[int, ...]], *, source: str) -> Plan:
    """Match ``meta`` (``{OSUM key: (shape, dtype)}``, in file order) against the table for ``cfg``.

    ``model_shapes`` are the JAX variable shapes of ``OSUM(cfg)`` (``nnx.eval_shape``). Raises
    :class:`CheckpointMismatch` naming every unknown key, missing key, duplicate and shape/dtype mismatch.
    """
    table = osum_table(cfg)
    by_key = {e.torch_key: e for e in table}
    problems: list[str] = []
    unknown, duplicates, seen = [], [], {}
    extras, aliases, layout = [], {}, []
    for key, (shape, dtype) in meta.items():
        rec = {"key": key, "dtype": dtype, "shape": list(shape)}
        if key in ALIASES:
            aliases[key] = ALIASES[key]
            layout.append(dict(rec, role="alias", of=ALIASES[key]))
            continue
        if any(re.fullmatch(p, key) for p in IGNORED):
            extras.append(key)
            layout.append(dict(rec, role="extra"))
            continue
        norm = normalize_osum_key(key)
        if norm not in by_key:
            unknown.append(f"{key} {list(shape)}")
            continue
        if norm in seen:
            duplicates.append(f"{seen[norm]} and {key}")
            continue
        seen[norm] = key
        layout.append(dict(rec, role="param"))
    missing = [peft_key(e.torch_key, cfg.lora.targets) for e in table if e.torch_key not in seen]
    for alias, target in aliases.items():
        if target not in meta:
            missing.append(f"{target} (aliased by {alias})")
        elif tuple(meta[alias][0]) != tuple(meta[target][0]) or meta[alias][1] != meta[target][1]:
            problems.append(f"{alias} {list(meta[alias][0])} {meta[alias][1]} is not the same tensor as {target} "
                            f"{list(meta[target][0])} {meta[target][1]}")
    if unknown:
        problems.append(f"{len(unknown)} unexpected key(s): {_head(unknown)}")
    if duplicates:
        problems.append(f"{len(duplicates)} key(s) given in both peft naming styles: {_head(duplicates)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_head(missing)}")
    leaves = group(table, seen)
    shapes, dtypes = {}, {}
    for path, items in leaves.items():
        jshape = tuple(model_shapes[path])
        want = items[0][1].external_shape(jshape)
        for key, e in items:
            got = tuple(meta[key][0])
            if got != want:
                problems.append(f"{key}: shape {list(got)} in {source}, the config needs {list(want)} "
                                f"(for {path} {list(jshape)})")
        kinds = sorted({meta[k][1] for k, _ in items})
        if len(kinds) > 1:
            problems.append(f"{path}: its layers are stored with different dtypes {kinds}")
        shapes[path], dtypes[path] = jshape, kinds[0]
    for key in extras:
        want = extra_shapes(cfg).get(key)
        if want is None:
            problems.append(f"unexpected key {key} {list(meta[key][0])} (only {sorted(extra_shapes(cfg))} are kept)")
    if problems:
        raise CheckpointMismatch(f"{source} does not match the config:\n  " + "\n  ".join(problems))
    return Plan(leaves, shapes, dtypes, extras, aliases, layout)


def _head(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# -- export -----------------------------------------------------------------------------------------------------


def export_sources(layout: Sequence[Mapping], cfg: ModelConfig) -> list[tuple[str, str, object]]:
    """For each key of ``layout`` (in order): ``(key, role, detail)`` where detail is the :class:`Entry`
    (role ``param``), the aliased key (``alias``) or ``None`` (``extra``). Checks that every model variable
    is covered exactly once."""
    by_key = {e.torch_key: e for e in osum_table(cfg)}
    out, covered, problems = [], set(), []
    for rec in layout:
        key, role = rec["key"], rec["role"]
        if role == "param":
            e = by_key.get(normalize_osum_key(key))
            if e is None:
                problems.append(f"{key}: not a model variable for this config")
                continue
            covered.add(e.torch_key)
            out.append((key, role, e))
        elif role == "alias":
            out.append((key, role, rec["of"]))
        elif role == "extra":
            out.append((key, role, None))
        else:
            problems.append(f"{key}: unknown role {role!r}")
    missing = [k for k in by_key if k not in covered]
    if missing:
        problems.append(f"the layout lacks {len(missing)} model variable(s): {_head(missing)}")
    if problems:
        raise CheckpointMismatch("checkpoint layout does not match its config:\n  " + "\n  ".join(problems))
    return out
