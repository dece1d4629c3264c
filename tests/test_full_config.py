"""Full-size OSUM builds abstractly with the published parameter counts; every parameter has logical axes."""

import jax
import numpy as np
from flax import nnx

from osum_jax.config_loading import load_config
from osum_jax.models import OSUM
from osum_jax.models.axes import LOGICAL_AXES
from osum_jax.models.layers import Buffer

# Published/derived facts (reference §1-3): HF Qwen2-7B has 7,615,616,512 parameters; the Whisper-medium
# encoder 305,680,384; OSUM's link (convs + speech transformer + projection) 51,963,392; speech_token_emded
# 4099 x 3584; LoRA r=8 on q,k,v,o,gate,down: 540,672 per layer, 15,138,816 in all.
QWEN2_7B = 7_615_616_512
WHISPER_MEDIUM_ENCODER = 305_680_384
LINK = 51_963_392
SPEECH_EMBED = 4099 * 3584
LORA = 15_138_816


def _count(state, kind, exclude=None):
    leaves = [v for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
              if isinstance(v, kind) and (exclude is None or not isinstance(v, exclude))]
    return sum(int(np.prod(v.shape)) for v in leaves)


def test_full_size_parameter_counts():
    cfg = load_config("configs/osum_full.yaml").model
    model = nnx.eval_shape(lambda: OSUM(cfg, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(model.llm), nnx.Param, nnx.LoRAParam) == QWEN2_7B
    assert _count(nnx.state(model.encoder), nnx.Param) == WHISPER_MEDIUM_ENCODER
    assert _count(nnx.state(model.adapter), nnx.Param) == LINK
    assert _count(nnx.state(model), nnx.LoRAParam) == LORA
    total = _count(nnx.state(model), nnx.Param)
    assert total == QWEN2_7B + WHISPER_MEDIUM_ENCODER + LINK + SPEECH_EMBED + LORA  # 8,003,089,920
    assert 7.95e9 < total < 8.05e9
    # fixed sinusoid tables are state (for exact checkpoint round trips) but not parameters
    assert _count(nnx.state(model), Buffer) == 1500 * 1024 + 5000 * 1024


def test_every_parameter_has_logical_axes():
    cfg = load_config("configs/osum_full.yaml").model
    model = nnx.eval_shape(lambda: OSUM(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        axes = var.get_metadata().get("out_sharding")
        name = ".".join(map(str, path))
        assert axes is not None and len(axes) == len(var.shape), name
        assert all(a in LOGICAL_AXES for a in axes), (name, axes)
        assert len(set(axes)) == len(axes), (name, axes)
        assert ("layers" in axes) == (".layers." in f".{name}."), name
    specs = nnx.get_partition_spec(nnx.state(model))
    assert specs["llm"]["layers"]["self_attn"]["k_proj"]["kernel"].get_value() == jax.sharding.PartitionSpec("layers", "embed", "kv_heads")
