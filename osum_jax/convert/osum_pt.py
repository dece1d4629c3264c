"""Rule table between the official OSUM flat state dict (``infer.pt``) and the JAX ``OSUM`` model.

OSUM's keys (reference §1.1, §2, §4) use wenet names for the Whisper encoder and the adapter and peft names
for the LLM. :func:`osum_rules` is the table (:class:`~osum_jax.convert.rules.Rule` rows, the encoder and adapter
blocks being the HF Whisper block rows of :mod:`.hf` under wenet names, the LLM the HF Qwen2 rows);
:func:`osum_table` expands it to one :class:`~osum_jax.convert.rules.Entry` per torch key:

======================================================  ==============================================  =========
OSUM key                                                JAX variable                                    transform
======================================================  ==============================================  =========
encoder.embed.conv.{0,2}.weight / bias                  encoder.conv{1,2}.kernel / bias                 conv / id
encoder.embed.pos_enc.pe  [1, 1500, D]                  encoder.embed_positions  [1500, D]  (Buffer)    pe
encoder.encoders.N.self_attn.linear_{q,k,v,out}.*       encoder.layers.self_attn.{q,k,v,out}_proj.*[N]  linear
encoder.encoders.N.feed_forward.w_{1,2}.*               encoder.layers.fc{1,2}.*[N]                     linear
encoder.encoders.N.norm{1,2}.*                          encoder.layers.{self_attn,final}_layer_norm.*   id
encoder.after_norm.*                                    encoder.layer_norm.*                            id
down_sample_2.conv.{1,4,7}.*                            adapter.downsample.convs.{0,1,2}.*              conv / id
speech_transformer.embed.out.0.* (Linear)               adapter.transformer.input_proj.*                linear
speech_transformer.embed.out.1.* (LayerNorm)            adapter.transformer.input_norm.*                id
speech_transformer.embed.pos_enc.pe  [1, 5000, D]       adapter.transformer.pos_table  (Buffer)         pe
speech_transformer.encoders.N.* / after_norm.*          adapter.transformer.layers.*[N] / layer_norm.*  as encoder
speech_llama_proj.*                                     adapter.proj.*                                  linear
speech_token_emded.weight                               speech_embed                                    id
llama_model.base_model.model.<HF Qwen2 key>             llm.* (hf.py Qwen2 table; peft names)           as hf.py
======================================================  ==============================================  =========

Transforms (:mod:`.rules`): ``linear`` torch ``[out, in]`` <-> ``[in, out]``; ``conv`` ``[out, in, k]`` <->
``[k, in, out]``; ``pe`` drops/adds the leading batch axis of the stored sinusoid tables; ``id`` copies. All are
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
from .hf import QWEN2_TOP, normalize_peft_key, qwen2_layer_rules, whisper_layer_rules
from .rules import CONV, IDENTITY, LINEAR, PE, Entry, Rule, expand, group, over_layers, prefixed

LLM_PREFIX = "llama_model.base_model.model."
IGNORED = (r"ln_speech\..*", r"speaker_head\..*")  # kept as extras, not model variables
ALIASES = {  # alias key -> the key it duplicates
    "embed_tokens.weight": LLM_PREFIX + "model.embed_tokens.weight",
    "lm_head.weight": LLM_PREFIX + "lm_head.weight",
}


# -- the table --------------------------------------------------------------------------------------------------

WENET_LAYER = {  # HF Whisper layer name (hf.WHISPER_LAYER) -> wenet name
    "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "fc1": "feed_forward.w_1",
    "fc2": "feed_forward.w_2", "self_attn.q_proj": "self_attn.linear_q", "self_attn.k_proj": "self_attn.linear_k",
    "self_attn.v_proj": "self_attn.linear_v", "self_attn.out_proj": "self_attn.linear_out",
}
_WENET_ORDER = ("self_attn.linear_q", "self_attn.linear_k", "self_attn.linear_v", "self_attn.linear_out",
                "feed_forward.w_1", "feed_forward.w_2", "norm1", "norm2")
_QWEN2_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
_LEAF_ORDER = ("weight", "bias", "lora_A", "lora_B")


def _module_order(rows: list[Rule], modules: Sequence[str]) -> list[Rule]:
    """Rows sorted as torch registers them (module order, then weight, bias, lora_A, lora_B)."""
    def rank(row: Rule):
        mod = next(i for i, m in enumerate(modules) if row.external.startswith(m + "."))
        leaf = next(i for i, x in enumerate(_LEAF_ORDER) if row.external[len(modules[mod]) + 1:].startswith(x))
        return mod, leaf
    return sorted(rows, key=rank)


def wenet_layer_rules(key_bias: bool) -> list[Rule]:
    """The rows of one wenet encoder block: the HF Whisper block rows renamed (:data:`WENET_LAYER`)."""
    rows = []
    for jax_name, hf_name, tr in whisper_layer_rules(key_bias):
        module = jax_name.rsplit(".", 1)[0]
        rows.append(Rule(jax_name, f"{WENET_LAYER[module]}.{hf_name.rsplit('.', 1)[1]}", tr))
    return _module_order(rows, _WENET_ORDER)


def osum_rules(cfg: ModelConfig) -> list[Rule]:
    """OSUM's table, in OSUM's state-dict order (JAX paths in ``OSUM``; LLM keys with plain HF names)."""
    enc, ad = cfg.encoder, cfg.adapter
    rows = [Rule("encoder.conv1.kernel", "encoder.embed.conv.0.weight", CONV),
            Rule("encoder.conv1.bias", "encoder.embed.conv.0.bias", IDENTITY),
            Rule("encoder.conv2.kernel", "encoder.embed.conv.2.weight", CONV),
            Rule("encoder.conv2.bias", "encoder.embed.conv.2.bias", IDENTITY),
            Rule("encoder.embed_positions", "encoder.embed.pos_enc.pe", PE)]
    rows += over_layers(wenet_layer_rules(enc.key_bias), "encoder.layers.", "encoder.encoders.")
    rows += [Rule("encoder.layer_norm.scale", "encoder.after_norm.weight", IDENTITY),
             Rule("encoder.layer_norm.bias", "encoder.after_norm.bias", IDENTITY)]
    st, at = "speech_transformer.", "adapter.transformer."
    rows += [Rule(at + "input_proj.kernel", st + "embed.out.0.weight", LINEAR),
             Rule(at + "input_proj.bias", st + "embed.out.0.bias", IDENTITY),
             Rule(at + "input_norm.scale", st + "embed.out.1.weight", IDENTITY),
             Rule(at + "input_norm.bias", st + "embed.out.1.bias", IDENTITY),
             Rule(at + "pos_table", st + "embed.pos_enc.pe", PE)]
    rows += over_layers(wenet_layer_rules(True), at + "layers.", st + "encoders.")
    rows += [Rule(at + "layer_norm.scale", st + "after_norm.weight", IDENTITY),
             Rule(at + "layer_norm.bias", st + "after_norm.bias", IDENTITY)]
    top = {r.jax: r for r in QWEN2_TOP}  # embed_tokens, norm.scale, lm_head
    block = _module_order(qwen2_layer_rules(cfg.llm, cfg.lora if cfg.lora.enabled else None), _QWEN2_ORDER)
    llm = [top["embed_tokens"], *over_layers(block, "layers.", "model.layers."), top["norm.scale"]]
    if not cfg.llm.tie_word_embeddings:
        llm.append(top["lm_head"])
    rows += prefixed(llm, "llm.", "llama_model.")
    # down_sample_2 = Sequential[pad, conv, GELU] x 3: the convs are children 1, 4, 7
    for i in range(len(ad.conv_strides)):
        rows += [Rule(f"adapter.downsample.convs.{i}.kernel", f"down_sample_2.conv.{3 * i + 1}.weight", CONV),
                 Rule(f"adapter.downsample.convs.{i}.bias", f"down_sample_2.conv.{3 * i + 1}.bias", IDENTITY)]
    rows += [Rule("adapter.proj.kernel", "speech_llama_proj.weight", LINEAR),
             Rule("adapter.proj.bias", "speech_llama_proj.bias", IDENTITY),
             Rule("speech_embed", "speech_token_emded.weight", IDENTITY)]
    return rows


def osum_stacks(cfg: ModelConfig) -> dict[str, int]:
    """The scanned stacks of ``OSUM(cfg)``: JAX path prefix -> number of layers."""
    return {"encoder.layers.": cfg.encoder.num_layers, "adapter.transformer.layers.": cfg.adapter.num_layers,
            "llm.layers.": cfg.llm.num_layers}


def osum_table(cfg: ModelConfig) -> list[Entry]:
    """Every model variable of ``OSUM(cfg)`` with its OSUM key(s), in OSUM's state-dict order."""
    return expand(osum_rules(cfg), osum_stacks(cfg))


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
