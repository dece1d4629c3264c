"""Multi-slice: a data-centre-network (DCN) data axis, as MaxText's ``dcn_data_parallelism``."""

import jax
import pytest

from osum_jax.config import ConfigError, MeshConfig

from osum_jax.config_loading import load_config
from osum_jax.perf.aot import compile_plan, parse_target
from osum_jax.train.mesh import build_mesh, mesh_shape


def test_mesh_sizes_are_per_slice_and_the_data_axis_spans_the_slices():
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=1, dcn_data=4), 8) == (8, 1, 1)
    with pytest.raises(ConfigError, match="per slice"):
        mesh_shape(MeshConfig(data=1, fsdp=8, tensor=1, dcn_data=2), 8)
    with pytest.raises(ConfigError, match="not divisible into 3 slices"):
        mesh_shape(MeshConfig(dcn_data=3), 8)
    devices = jax.devices()[:8]
    mesh = build_mesh(MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # simulated devices carry no slice index: the first four are slice 0, the data axis's first row
    assert {d.id for d in mesh.devices[0].flat} == {d.id for d in devices[:4]}
    assert {d.id for d in mesh.devices[1].flat} == {d.id for d in devices[4:]}


def test_target_spec_with_slices():
    t = parse_target("tpu:v5p:2x2x4:2")
    assert (t.devices, t.slices, t.topology) == (32, 2, "v5p:2x2x4")
    for bad in ("tpu:v5p:2x2x4:0", "tpu:v5p:2x2x4:x", "cuda:h100:8:2"):
        with pytest.raises(ValueError):
            parse_target(bad)


@pytest.mark.target
@pytest.mark.slow  # a TPU compile of the tiny model over two slices (~40 s)
def test_two_slices_compile_with_only_the_gradient_reduction_across_them(tpu_compiler, tmp_path):
    """Two v5p 2x2x1 slices (4 chips each): fsdp inside each slice, data across. XLA:TPU compiles one program per
    slice: its collectives' replica groups hold only that slice's 4 chips (ICI), and what crosses the data-centre
    network goes to the megascale runtime as host transfers; all of those are all-reduces (the data-parallel
    gradient reduction), none an FSDP all-gather. The report counts them as ``dcn all_reduce``."""
    import re

    cfg = load_config("configs/tiny.yaml", [
        "model.dtype=bfloat16", "train.mesh.data=1", "train.mesh.fsdp=-1", "train.mesh.dcn_data=2",
        "data.frame_buckets=[1000]", "data.max_frames=1000", "data.target_buckets=[48]",
        "data.max_label_tokens=48", "data.max_frames_per_batch=1000", "data.max_tokens_per_batch=1000",
        "data.max_utts_per_device=1", "data.max_prompt_tokens=64"])
    hlo = tmp_path / "step.hlo"
    r = compile_plan(cfg, "tpu:v5p:2x2x1:2", hlo_out=str(hlo))
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["batch_shape"]["batch"] == 8
    text = hlo.read_text()
    groups = re.findall(r"replica_groups=\{(\{[^=]*?\})\}", text)
    ids = {int(v) for g in groups for v in re.findall(r"\d+", g)}
    assert groups and ids == {0, 1, 2, 3}, ids  # every ICI collective stays on one slice
    kinds = set(re.findall(r'_xla_megascale_transfer_type="([^"]+)"', text))
    assert kinds == {"ALL_REDUCE"}, kinds
    dcn = {k: v for k, v in r["collectives"].items() if k.startswith("dcn")}
    assert list(dcn) == ["dcn all_reduce"] and dcn["dcn all_reduce"]["count"] > 0 and dcn["dcn all_reduce"]["bytes"] > 0
