"""Left-padded rows stay finite on attention kernels that return NaN for a fully masked query row (as some CUDA /
NPU SDPA kernels do): simulated on CPU by a kernel that does exactly that."""

import numpy as np
import pytest
import torch
from flax import nnx

from osum_jax.convert.torch_package import export_torch_package
from osum_jax.models import OSUM
from osum_torch_infer.attention import unmask_empty_rows
from osum_torch_infer.modeling import OSUMForConditionalGeneration
from tests.corpus import train_tokenizer
from tests.helpers import tiny_model_config

CFG = tiny_model_config()
_sdpa = torch.nn.functional.scaled_dot_product_attention


def nan_on_empty_rows(query, key, value, attn_mask=None, **kw):
    """The real kernel, except that a query row with no key to attend to comes out NaN."""
    out = _sdpa(query, key, value, attn_mask=attn_mask, **kw)
    if attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask) & (
            attn_mask > torch.finfo(attn_mask.dtype).min)
        empty = ~allowed.any(dim=-1)  # [B, 1|H, Q]
        out = out.masked_fill(empty[..., None].expand_as(out), float("nan"))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanpkg")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, root / "tok", vocab_size=300)
    export_torch_package(OSUM(CFG, rngs=nnx.Rngs(0)), CFG, root / "pkg", tokenizer_dir=tok, dtype="fp32",
                         progress=False)
    return OSUMForConditionalGeneration.from_pretrained(root / "pkg", device="cpu", dtype="fp32")


def _inputs():
    rng = np.random.default_rng(0)
    lengths = [160, 90, 37]
    feats = rng.standard_normal((3, 160, 80)).astype(np.float32)
    prompts = [[5, 6, 7, 8, 9], [10, 11], []]  # unequal prompts: real left padding
    return feats, np.array(lengths), prompts


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_batched_equals_one_by_one_under_a_nan_kernel(model, monkeypatch, engine):
    feats, lengths, prompts = _inputs()
    single = [model.generate(feats[i:i + 1, :lengths[i]], lengths[i:i + 1], [prompts[i]], max_new_tokens=8,
                             engine=engine)[0] for i in range(3)]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_on_empty_rows)
    batched = model.generate(feats, lengths, prompts, max_new_tokens=8, engine=engine)
    assert [list(map(int, t)) for t in batched] == [list(map(int, t)) for t in single]


def test_teacher_forced_forward_is_finite_under_a_nan_kernel(model, monkeypatch):
    rng = np.random.default_rng(1)
    batch = dict(feats=rng.standard_normal((2, 120, 80)).astype(np.float32), feats_lengths=np.array([120, 64]),
                 prompt=np.array([[5, 6, 7], [-1, -1, -1]]), prompt_lengths=np.array([3, 0]),
                 target=np.array([[10, 11, 12], [13, -100, -100]]), target_lengths=np.array([3, 1]))
    with torch.no_grad():
        ref = model(batch)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_on_empty_rows)
        out = model(batch)
    assert torch.isfinite(out["loss"]) and torch.equal(out["loss"], ref["loss"])


def test_unmask_empty_rows_opens_only_empty_rows():
    m = torch.tensor([[[[True, False], [False, False]]]])
    assert unmask_empty_rows(m).tolist() == [[[[True, False], [True, True]]]]
    f = torch.tensor([[[[0.0, float("-inf")], [float("-inf"), float("-inf")]]]])
    assert unmask_empty_rows(f).tolist() == [[[[0.0, float("-inf")], [0.0, 0.0]]]]
    assert unmask_empty_rows(None) is None
