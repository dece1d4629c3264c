"""Per-device batches packed by OSUM's rule (wenet ``dynamic_batch``), then padded to static bucket shapes."""

import json

import grain
import numpy as np
import pytest

from osum_jax.config import DataConfig
from osum_jax.data.pipeline import BucketBatchIterator, BucketSpec, packing_report, real_rows


def osum_dynamic_batch(items, max_frames, max_seq, max_rows=None):
    """OSUM's batching rule, written here from its description (reference section 6.2, item 12): keep adding
    while longest_frames * (n + 1) <= max_frames and longest_seq * (n + 1) <= max_seq, where the longest values
    include the newcomer; seq = frames / 8 + label + prompt. ``max_rows`` adds a cap on n."""
    out, buf, lf, ls = [], [], 0, 0.0
    for i, (f, t, p) in items:
        seq = f / 8 + t + p
        lf2, ls2 = max(lf, f), max(ls, seq)
        n = len(buf) + 1
        if buf and (lf2 * n > max_frames or ls2 * n > max_seq or (max_rows and n > max_rows)):
            out.append(buf)
            buf, lf, ls = [i], f, seq
        else:
            buf.append(i)
            lf, ls = lf2, ls2
    if buf:
        out.append(buf)
    return out


def mixed_lengths(n, seed):
    rng = np.random.default_rng(seed)
    frames = np.exp(rng.uniform(np.log(30), np.log(2900), n)).astype(int)
    return [(int(f), int(rng.integers(1, 120)), int(rng.integers(5, 40))) for f in frames]


def examples(items):
    return [{"index": i, "key": f"u{i}", "task": "<TRANSCRIBE>", "feats": np.full((f, 2), i, np.float32),
             "prompt": np.arange(p, dtype=np.int32), "target": np.arange(t, dtype=np.int32) + 1}
            for i, (f, t, p) in enumerate(items)]


def stream(exs):
    return iter(grain.MapDataset.source(exs).to_iter_dataset())


def groups_of(batch, spec):
    """The per-device groups of a batch: device d owns rows d * per_device ... (d + 1) * per_device."""
    bucket = (batch["feats"].shape[1], batch["target"].shape[1])
    cap = spec.per_device[bucket]
    idx = batch["indices"]
    return bucket, [[int(i) for i in idx[d * cap:(d + 1) * cap] if i >= 0] for d in range(spec.devices)]


@pytest.mark.parametrize("devices", [2, 8])
def test_one_bucket_packs_exactly_by_osums_rule(devices):
    cfg = DataConfig(frame_buckets=(2900,), target_buckets=(200,), max_utts_per_device=64, min_frames=0)
    spec = BucketSpec.from_config(cfg, devices=devices, prompt_len=40)
    items = mixed_lengths(300, seed=devices)
    exs = examples(items)
    it = BucketBatchIterator(stream(exs), spec, lambda g: exs[g], 2)
    got = []
    for b in it:
        assert b["feats"].shape[0] == devices * spec.per_device[(2900, 200)]
        _, groups = groups_of(b, spec)
        got += [g for g in groups if g]
        # each device's rows fit OSUM's budgets on their own
        for g in groups:
            if len(g) > 1:
                assert max(items[i][0] for i in g) * len(g) <= 3900
                assert max(items[i][0] / 8 + items[i][1] + items[i][2] for i in g) * len(g) <= 1900
    assert got == osum_dynamic_batch(list(enumerate(items)), 3900, 1900)


def test_default_buckets_follow_the_rule_per_bucket_and_stay_in_budget():
    cfg = DataConfig(min_frames=0)  # OSUM's budgets 3900 / 1900 frames / tokens per device, 8 rows at most
    spec = BucketSpec.from_config(cfg, devices=2, prompt_len=40)
    # budget-aligned frame buckets: 3900 // n frames for n = 8 .. 2, and max_frames for one utterance
    assert spec.frame_buckets == (487, 557, 650, 780, 975, 1300, 1950, 2900)
    assert [spec.per_device[(f, 48)] for f in spec.frame_buckets] == [8, 7, 6, 5, 4, 3, 2, 1]
    for (f, t), n in spec.per_device.items():
        assert n * f <= 3900  # the padded rows of a device stay within the frame budget
    items = mixed_lengths(400, seed=3)
    exs = examples(items)
    got: dict = {}
    for b in BucketBatchIterator(stream(exs), spec, lambda g: exs[g], 2):
        bucket, groups = groups_of(b, spec)
        got.setdefault(bucket, []).extend(g for g in groups if g)
    for bucket, groups in got.items():
        mine = [(i, it) for i, it in enumerate(items) if spec.bucket_of(it[0], it[1]) == bucket]
        assert groups == osum_dynamic_batch(mine, 3900, 1900, max_rows=8), bucket


def test_resume_mid_group_gives_the_same_batches():
    cfg = DataConfig(min_frames=0)
    spec = BucketSpec.from_config(cfg, devices=2, prompt_len=40)
    exs = examples(mixed_lengths(200, seed=5))

    a = BucketBatchIterator(stream(exs), spec, lambda g: exs[g], 2)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    assert any(closed or open_ for _, closed, open_ in state["buffers"])
    rest = list(a)
    b = BucketBatchIterator(stream(exs), spec, lambda g: exs[g], 2)
    b.set_state(state)
    again = list(b)
    assert len(rest) == len(again)
    for x, y in zip(rest, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_packing_report_counts_padding():
    cfg = DataConfig(frame_buckets=(1000,), target_buckets=(10,), max_utts_per_device=4, min_frames=0,
                     max_frames=1000, max_label_tokens=10)
    spec = BucketSpec.from_config(cfg, devices=1, prompt_len=0)
    # 5 utterances of 900 frames: the rule packs 4 (4 x 900 = 3600 <= 3900, 5 x 900 > 3900), then the last one;
    # the bucket's static rows are min(3900 // 1, 4) = 4, so 2 batches of 4 rows
    rep = packing_report(spec, [(900, 10, 0)] * 5)
    assert spec.per_device[(1000, 10)] == 4
    t = rep["total"]
    assert (t["batches"], t["rows"], t["utterances"]) == (2, 8, 5)
    assert t["frames"] == 5 * 900 and t["padded_frames"] == 8 * 1000
    assert t["frame_waste"] == pytest.approx(1 - 4500 / 8000)
    # LLM positions: real 5 x (0 + 113 + 2 + 10), padded 8 x (0 + 125 + 2 + 10)
    assert t["token_waste"] == pytest.approx(1 - 5 * 125 / (8 * 137))
    assert real_rows({"indices": np.array([3, -1, 0])}).tolist() == [True, False, True]


def test_fill_packing_keeps_the_padded_budget_rule():
    """data.packing=fill (configs/demo.yaml): rows = min(frames budget // F, tokens budget // (P + F/8 + 2 + L))."""
    cfg = DataConfig(frame_buckets=(128, 256), max_frames=256, target_buckets=(16,), max_label_tokens=16,
                     max_frames_per_batch=3072, max_tokens_per_batch=100000, packing="fill")
    spec = BucketSpec.from_config(cfg, devices=1, prompt_len=24)
    assert spec.per_device == {(128, 16): 24, (256, 16): 12}
    items = [(100, 5, 3)] * 30  # the rule would stop at 30; fill takes 24 rows whatever the lengths
    rep = packing_report(spec, items)
    assert (rep["total"]["batches"], rep["total"]["rows"]) == (2, 48)


def test_global_batch_proposal_reproduces_the_recipe_and_respects_memory():
    """``--plan --global-frames``: every candidate's per-device budget x devices x accumulation covers the
    recipe's frames per optimizer step (within one frame per device and step); the proposal is the fewest
    accumulation steps whose memory estimate leaves 20 % free, so less memory means more accumulation."""
    from osum_jax.config_loading import load_config
    from osum_jax.perf.plan import propose_recipe

    cfg = load_config("configs/tiny.yaml", ["train.mesh.data=2", "train.mesh.fsdp=1", "data.max_prompt_tokens=16"])
    big = propose_recipe(cfg, 2, 80.0, 24 * 4 * 3900, max_accum=4)
    for r in big["candidates"]:
        assert 374400 <= r["global_frames"] < 374400 + 2 * r["grad_accum"]
        assert r["max_tokens_per_batch"] == -(-1900 * r["max_frames_per_batch"] // 3900)
    assert big["proposal"]["grad_accum"] == 1
    need = [r["estimate_GiB"] for r in big["candidates"]]
    assert need == sorted(need, reverse=True)  # smaller per-device batches need less memory
    # a device that holds only candidates from the third on (80 % of it is what may be used)
    mem = (need[2] + need[1]) / 2 / 0.8 * 1024 ** 3 / 1e9
    small = propose_recipe(cfg, 2, mem, 24 * 4 * 3900, max_accum=4)
    assert small["proposal"]["grad_accum"] == 3
    assert "train.grad_accum=3" in small["overrides"]
