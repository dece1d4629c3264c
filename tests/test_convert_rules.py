"""The converter's rule tables (osum_jax/convert/rules.py): every row of every external format round-trips."""

import numpy as np

from osum_jax import checkpoint as ck
from osum_jax.config_loading import load_config
from osum_jax.convert.hf import qwen2_rules, whisper_rules
from osum_jax.convert.osum_pt import osum_table
from osum_jax.convert.package_table import package_rules, package_stacks
from osum_jax.convert.rules import TRANSFORMS, expand, prefixed
from tests.helpers import TINY


def _tables(cfg):
    """Each format's entries, with JAX paths in ``OSUM`` (what import and export read)."""
    m = cfg.model
    lora = m.lora if m.lora.rank > 0 else None
    hf_whisper = expand(prefixed(whisper_rules(m.encoder.key_bias), "encoder.", ""),
                        {"encoder.layers.": m.encoder.num_layers})
    hf_qwen2 = expand(prefixed(qwen2_rules(m.llm, lora), "llm.", ""), {"llm.layers.": m.llm.num_layers})
    return {"hf-whisper": hf_whisper, "hf-qwen2": hf_qwen2, "osum-pt": osum_table(m),
            "torch-package": expand(package_rules(m), package_stacks(m), layer_major=False)}


def test_every_row_of_every_table_round_trips_bit_exactly():
    rng = np.random.default_rng(0)
    checked = set()
    for overrides in ([], ["model.encoder.key_bias=true", "model.llm.tie_word_embeddings=true",
                           "model.lora.targets=[q_proj,up_proj]"]):
        cfg = load_config(TINY, overrides)
        shapes = ck.model_shapes(cfg)
        values = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
        for fmt, entries in _tables(cfg).items():
            keys = [e.torch_key for e in entries]
            assert len(set(keys)) == len(keys), fmt
            if fmt in ("osum-pt", "torch-package"):  # the whole model, every variable
                assert {e.jax_path for e in entries} == set(shapes), fmt
            bad = []
            for e in entries:
                jax = values[e.jax_path] if e.layer is None else values[e.jax_path][e.layer]
                ext = e.transform.inverse(jax)
                if ext.shape != e.external_shape(shapes[e.jax_path]):
                    bad.append(f"{fmt} {e.torch_key}: inverse gives {ext.shape}, "
                               f"external_shape {e.external_shape(shapes[e.jax_path])}")
                back = e.transform.forward(np.ascontiguousarray(ext))
                if back.shape != jax.shape or back.tobytes() != jax.tobytes():
                    bad.append(f"{fmt} {e.torch_key}: forward(inverse(x)) != x")
                again = e.transform.inverse(back)
                if np.ascontiguousarray(again).tobytes() != np.ascontiguousarray(ext).tobytes():
                    bad.append(f"{fmt} {e.torch_key}: inverse(forward(y)) != y")
                checked.add(e.transform.name)
            assert not bad, bad[:10]
    assert checked == {t.name for t in TRANSFORMS}  # every transform exercised


# -- one literal table per format, each defined once -------------------------------------------------------------


def _reference_osum_keys(enc_layers: int, ad_layers: int, llm_layers: int) -> list[str]:
    """OSUM's state-dict keys in order, written from ../shared/docs/osum-reference.md §4 (and §1.1, §2), not
    from the converter's table: wenet encoder without a key bias, the 4-block speech_transformer, peft >= 0.7
    names on the LoRA-wrapped projections (all but up_proj), the aliases, the unused tensors."""
    wb = ("weight", "bias")

    def wenet(prefix: str, n: int, key_bias: bool) -> list[str]:
        out = []
        for i in range(n):
            b = f"{prefix}.encoders.{i}."
            out += [b + f"self_attn.linear_q.{x}" for x in wb]
            out += [b + "self_attn.linear_k.weight"] + ([b + "self_attn.linear_k.bias"] if key_bias else [])
            out += [b + f"self_attn.linear_{m}.{x}" for m in ("v", "out") for x in wb]
            out += [b + f"feed_forward.w_{m}.{x}" for m in (1, 2) for x in wb]
            out += [b + f"norm{m}.{x}" for m in (1, 2) for x in wb]
        return out

    keys = [f"encoder.embed.conv.{c}.{x}" for c in (0, 2) for x in wb] + ["encoder.embed.pos_enc.pe"]
    keys += wenet("encoder", enc_layers, key_bias=False) + [f"encoder.after_norm.{x}" for x in wb]
    keys += [f"ln_speech.{x}" for x in wb]
    keys += [f"speech_transformer.embed.out.{c}.{x}" for c in (0, 1) for x in wb]
    keys += ["speech_transformer.embed.pos_enc.pe"]
    keys += wenet("speech_transformer", ad_layers, key_bias=True) + [f"speech_transformer.after_norm.{x}" for x in wb]
    llm = "llama_model.base_model.model."
    keys.append(llm + "model.embed_tokens.weight")
    lora = [f"lora_{ab}.default.weight" for ab in "AB"]
    for i in range(llm_layers):
        b = f"{llm}model.layers.{i}."
        for m in ("q", "k", "v"):
            keys += [b + f"self_attn.{m}_proj.base_layer.{x}" for x in wb]
            keys += [b + f"self_attn.{m}_proj.{x}" for x in lora]
        keys += [b + "self_attn.o_proj.base_layer.weight"] + [b + f"self_attn.o_proj.{x}" for x in lora]
        keys += [b + "mlp.gate_proj.base_layer.weight"] + [b + f"mlp.gate_proj.{x}" for x in lora]
        keys += [b + "mlp.up_proj.weight"]
        keys += [b + "mlp.down_proj.base_layer.weight"] + [b + f"mlp.down_proj.{x}" for x in lora]
        keys += [b + "input_layernorm.weight", b + "post_attention_layernorm.weight"]
    keys += [llm + "model.norm.weight", llm + "lm_head.weight"]
    keys += [f"down_sample_2.conv.{c}.{x}" for c in (1, 4, 7) for x in wb]
    keys += [f"speech_llama_proj.{x}" for x in wb]
    keys += ["embed_tokens.weight", "lm_head.weight", "speech_token_emded.weight"]
    keys += [f"speaker_head.{x}" for x in wb]
    return keys


def test_osum_keys_are_osum_s_real_names_and_map_one_to_one_onto_the_model():
    from osum_jax.convert.osum_pt import ALIASES, IGNORED, canonical_keys, normalize_osum_key

    full = load_config("configs/osum_full.yaml").model
    assert len(_reference_osum_keys(24, 4, 28)) == 1128
    assert canonical_keys(full) == _reference_osum_keys(24, 4, 28)
    cfg = load_config(TINY)
    m = cfg.model
    assert canonical_keys(m) == _reference_osum_keys(m.encoder.num_layers, m.adapter.num_layers, m.llm.num_layers)

    # every OSUM parameter key -> exactly one (JAX variable, layer); every (variable, layer) -> exactly one key
    import re

    table = osum_table(m)
    by_key = {e.torch_key: (e.jax_path, e.layer) for e in table}
    params = [k for k in canonical_keys(m) if k not in ALIASES and not any(re.fullmatch(p, k) for p in IGNORED)]
    targets = [by_key[normalize_osum_key(k)] for k in params]
    assert len(params) == len(table) == len(set(targets))
    stacks = package_stacks(m)
    want = set()
    for path, shape in ck.model_shapes(cfg).items():
        stacked = any(path.startswith(p) for p in stacks)
        want |= {(path, i) for i in range(shape[0])} if stacked else {(path, None)}
    assert set(targets) == want


def _module_tree(name: str):
    import ast
    import importlib.util

    return ast.parse(open(importlib.util.find_spec(f"osum_jax.convert.{name}").origin).read())


def test_each_table_is_one_literal_defined_once():
    """Rows are written only inside the four module-level literal tables (no row built by code, no second copy),
    and within a table each external key and each JAX path appears once."""
    import ast
    import pkgutil

    import osum_jax.convert as conv
    from osum_jax.convert import hf, osum_pt, package_table

    tables = {("hf", "WHISPER"), ("hf", "QWEN2"), ("osum_pt", "OSUM"), ("package_table", "PACKAGE")}
    found, stray = set(), []
    for mod in pkgutil.iter_modules(conv.__path__):
        tree = _module_tree(mod.name)
        literal_rows = set()
        for node in tree.body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and targets:
                rows = [e for e in node.value.elts if isinstance(e, ast.Call) and getattr(e.func, "id", "") == "Rule"]
                if rows:
                    assert len(rows) == len(node.value.elts), f"{mod.name}.{targets[0]}: a non-row element"
                    assert all(isinstance(a, ast.Constant) for r in rows for a in r.args if not isinstance(a, ast.Name))
                    found.add((mod.name, targets[0]))
                    literal_rows |= {id(r) for r in rows}
        stray += [f"{mod.name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and getattr(n.func, "id", "") == "Rule" and id(n) not in literal_rows]
        for n in ast.walk(tree):  # no table derived from another: rows are only selected from their own table
            if not isinstance(n, ast.Call) or mod.name == "rules":
                continue
            fn = getattr(n.func, "id", None) or getattr(n.func, "attr", "")
            if fn in ("prefixed", "_replace"):
                stray.append(f"{mod.name}:{n.lineno} {fn}")
            if fn == "select" and (mod.name, getattr(n.args[0], "id", "")) not in tables:
                stray.append(f"{mod.name}:{n.lineno} select from {ast.unparse(n.args[0])}")
    assert found == tables
    assert not stray, f"Rule rows built or derived outside the literal tables: {stray}"
    for rows in (hf.WHISPER, hf.QWEN2, osum_pt.OSUM, package_table.PACKAGE):
        assert len({r.external for r in rows}) == len(rows)
        assert len({r.jax for r in rows}) == len(rows)


def test_commands_share_helpers_through_common_modules_not_each_other():
    import ast

    commands = {"import_hf", "import_osum", "export_osum", "export_torch", "average", "inspect"}
    bad = []
    for name in commands:
        for node in ast.walk(_module_tree(name)):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and (node.module or "") in commands:
                bad.append(f"{name} imports {node.module}")
    assert not bad, bad
