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
