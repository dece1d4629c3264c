"""The Grain pipeline on real speech: raw == shards, exact resume, process sharding, bad input, static shapes."""

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from osum_jax.config import ConfigError, DataConfig
from osum_jax.data import DataPipeline, PromptBook, Tokenizer, normalize_label, skip_counts
from osum_jax.data.audio import decode_audio
from osum_jax.data.cli import make_shards
from osum_jax.data.records import SampleError
from osum_jax.data.sources import MixedSource, open_source


def cfg_for(corpus, **kw) -> DataConfig:
    base = dict(tokenizer=str(corpus["tokenizer"]), frame_buckets=(200, 400, 800), max_frames=800,
                target_buckets=(16, 32, 64), max_label_tokens=64, max_prompt_tokens=128,
                max_frames_per_batch=1200, max_tokens_per_batch=1200, seed=7, num_epochs=2)
    base.update(kw)
    cfg = DataConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def pcm_corpus(speech_corpus, tmp_path_factory):
    """The speech corpus as 16 kHz int16 mono wavs (what shards store), its data.list and its shards."""
    root = tmp_path_factory.mktemp("pcm")
    lines = []
    for e in speech_corpus["entries"]:
        if e["key"] == "segment":
            continue
        wave, _, _ = decode_audio(e["wav"])
        path = root / f"{e['key']}.wav"
        sf.write(path, wave, 16000, subtype="PCM_16")
        lines.append(dict(e, wav=str(path)))
    lines.append({"key": "segment", "wav": str(root / "utt0.wav"), "txt": "the quick brown fox", "start": 0.25,
                  "end": 1.5})
    data_list = root / "data.list"
    data_list.write_text("".join(json.dumps(e) + "\n" for e in lines))
    summary = make_shards(data_list, root / "shards", per_shard=4, workers=2, progress=False)
    assert summary["utterances"] == len(lines) and summary["shards"] == 3 and not summary["skipped"]
    return dict(speech_corpus, list=data_list, shards=root / "shards" / "shards_list.txt", n=len(lines))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_raw_list_and_shards_give_identical_batches(pcm_corpus):
    cfg = cfg_for(pcm_corpus)
    raw = list(DataPipeline(cfg, str(pcm_corpus["list"]), shard_index=0, shard_count=1))
    shards = list(DataPipeline(cfg, str(pcm_corpus["shards"]), shard_index=0, shard_count=1))
    assert_same_batches(raw, shards)
    keys = [k for b in raw for k in b["keys"][: b["num_real"]]]
    expected = [json.loads(line)["key"] for line in pcm_corpus["list"].read_text().splitlines()]
    assert sorted(keys) == sorted(expected * 2)  # two epochs, nothing lost in the buckets


def test_batches_have_static_shapes_and_contract(pcm_corpus):
    cfg = cfg_for(pcm_corpus)
    pipe = DataPipeline(cfg, str(pcm_corpus["list"]), shard_index=0, shard_count=1)
    allowed = set(pipe.spec.shapes)
    assert len(allowed) == 9  # 3 frame buckets x 3 target buckets
    tok = pipe.tokenizer
    for b in pipe:
        bs, f, m = b["feats"].shape
        assert (bs, f, b["prompt"].shape[1], b["target"].shape[1]) in allowed and m == 80
        for i in range(bs):
            n, t, p = b["feats_lengths"][i], b["target_lengths"][i], b["prompt_lengths"][i]
            assert (b["target"][i, t:] == -100).all() and (b["prompt"][i, p:] == -1).all()
            assert (b["feats"][i, n:] == 0).all()
            if i < b["num_real"]:
                assert b["target"][i, t - 1] == tok.eod_id
                assert tok.decode(b["target"][i, :t - 1]) == tok.decode(tok.encode(
                    tok.decode(b["target"][i, :t - 1])))
            else:
                assert n == 1 and t == 0 and p == 0


def test_labels_are_normalized_and_prompts_match_tasks(pcm_corpus):
    cfg = cfg_for(pcm_corpus, num_epochs=1)
    pipe = DataPipeline(cfg, str(pcm_corpus["list"]), shard_index=0, shard_count=1)
    by_key = {e["key"]: e for e in json.loads("[" + ",".join(pcm_corpus["list"].read_text().splitlines()) + "]")}
    seen = 0
    for b in pipe:
        for i in range(b["num_real"]):
            key = b["keys"][i]
            label = pipe.tokenizer.decode(b["target"][i, :b["target_lengths"][i] - 1])
            assert label == normalize_label(by_key[key]["txt"])
            prompt = pipe.tokenizer.decode(b["prompt"][i, :b["prompt_lengths"][i]])
            task = by_key[key].get("task") or "<TRANSCRIBE>"
            assert prompt in pipe.prompts.prompts[task]
            seen += 1
    assert seen == pcm_corpus["n"]


def test_prompt_length_is_measured_from_the_prompt_book(pcm_corpus):
    """data.max_prompt_tokens=0 (the default): the static prompt length is the longest prompt of the data's
    tasks with the run's tokenizer, rounded up to 8; every batch has it."""
    pipe = DataPipeline(cfg_for(pcm_corpus, max_prompt_tokens=0, num_epochs=1), str(pcm_corpus["list"]),
                        shard_index=0, shard_count=1)
    tok = Tokenizer(str(pcm_corpus["tokenizer"]))
    tasks = {json.loads(line).get("task") or "<TRANSCRIBE>" for line in pcm_corpus["list"].read_text().splitlines()}
    longest = max(len(tok.encode(p)) for t in tasks for p in pipe.prompts.prompts[t])
    assert pipe.prompt_len == -(-longest // 8) * 8 and pipe.prompt_len >= longest
    assert {b["prompt"].shape[1] for b in pipe} == {pipe.prompt_len}


def test_exact_resume(pcm_corpus):
    cfg = cfg_for(pcm_corpus, num_epochs=3)
    pipe = DataPipeline(cfg, str(pcm_corpus["shards"]), shard_index=0, shard_count=1)
    it = iter(pipe.dataset())
    take(it, 4)
    state = it.get_state()
    assert any(closed or open_ for _, closed, open_ in state["buffers"])  # samples were waiting in buckets
    expected = take(it, 5)
    fresh = iter(DataPipeline(cfg, str(pcm_corpus["shards"]), shard_index=0, shard_count=1).dataset())
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives JSON (orbax stores it that way)
    assert_same_batches(take(fresh, 5), expected)


def test_two_process_sharding_is_disjoint_and_complete(pcm_corpus):
    cfg = cfg_for(pcm_corpus, num_epochs=1)
    per_shard = []
    for k in range(2):
        keys = [key for b in DataPipeline(cfg, str(pcm_corpus["list"]), shard_index=k, shard_count=2)
                for key in b["keys"][: b["num_real"]]]
        per_shard.append(keys)
    assert not set(per_shard[0]) & set(per_shard[1])
    assert sorted(per_shard[0] + per_shard[1]) == sorted(
        json.loads(line)["key"] for line in pcm_corpus["list"].read_text().splitlines())


def test_shuffle_and_augmentation_depend_on_seed_and_epoch(pcm_corpus):
    cfg = cfg_for(pcm_corpus, num_epochs=2)
    pipe = DataPipeline(cfg, str(pcm_corpus["list"]), shard_index=0, shard_count=1)
    proc = pipe.processor
    n = len(pipe.source)
    order0 = [proc.record_of(g)[0] for g in range(n)]
    order1 = [proc.record_of(g)[0] for g in range(n, 2 * n)]
    assert sorted(order0) == sorted(order1) == list(range(n)) and order0 != order1
    a, b = proc.process(0, 0), proc.process(0, 0)
    np.testing.assert_array_equal(a["feats"], b["feats"])
    c = proc.process(0, 1)
    assert not np.array_equal(a["feats"], c["feats"])  # SpecAug differs per epoch
    clean = DataPipeline(dataclasses.replace(cfg, spec_aug=False, spec_sub=False), str(pcm_corpus["list"]),
                         shard_index=0, shard_count=1).processor.process(0, 0)
    assert (a["feats"] == 0).sum() > (clean["feats"] == 0).sum()  # masks are filled with 0.0
    book = PromptBook.load()
    picks = {book.choose("<TRANSCRIBE>", 7, e, 3) for e in range(20)}
    assert len(picks) > 1 and book.choose("<TRANSCRIBE>", 7, 5, 3) == book.choose("<TRANSCRIBE>", 7, 5, 3)


def test_mixed_source_weights(pcm_corpus, tmp_path):
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"a:\n  path: {pcm_corpus['list']}\n  weight: 2\nb:\n  path: {pcm_corpus['shards']}\n"
                   f"  weight: 0.5\n")
    src = MixedSource(mix)
    n = pcm_corpus["n"]
    assert len(src) == 2 * n + n // 2
    keys = [src[i]["key"] for i in range(len(src))]
    assert keys[:n] == keys[n:2 * n]
    assert open_source(mix).__class__ is MixedSource


def test_unknown_task_is_reported_at_start_up(pcm_corpus, tmp_path):
    """Counted and warned at start-up (the lines are skipped, see test_robustness.py); strict mode refuses,
    naming the line."""
    lst = tmp_path / "d.list"
    e = json.loads(pcm_corpus["list"].read_text().splitlines()[0])
    lst.write_text(json.dumps(e) + "\n" + json.dumps(dict(e, task="<TRANSCRIBE> <DIALECT>")) + "\n")
    pipe = DataPipeline(cfg_for(pcm_corpus), str(lst), shard_index=0, shard_count=1)
    assert pipe.unknown_tasks == {"<TRANSCRIBE> <DIALECT>": 1}
    with pytest.raises(ValueError, match=rf"{lst}:2.*unknown task.*<DIALECT>.*known: \[.*<TRANSCRIBE>"):
        DataPipeline(cfg_for(pcm_corpus, strict=True), str(lst), shard_index=0, shard_count=1)
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        DataPipeline(cfg_for(pcm_corpus, max_prompt_tokens=4), str(pcm_corpus["list"]), shard_index=0,
                     shard_count=1)
    # only the prompts of tasks the data has must fit: a long prompt of an unused task costs nothing
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text('"<TRANSCRIBE>": ["transcribe"]\n"<ALIGN>": ["' + "align every word " * 20 + '"]\n')
    one = tmp_path / "one.list"
    one.write_text(json.dumps(dict(e, task="<TRANSCRIBE>")) + "\n")
    DataPipeline(cfg_for(pcm_corpus, max_prompt_tokens=8, prompts=str(prompts)), str(one), shard_index=0,
                 shard_count=1)
    one.write_text(json.dumps(dict(e, task="<ALIGN>")) + "\n")
    with pytest.raises(ConfigError, match="prompt for '<ALIGN>' in .*prompts.yaml has .* tokens > data.max_prompt_tokens=8"):
        DataPipeline(cfg_for(pcm_corpus, max_prompt_tokens=8, prompts=str(prompts)), str(one), shard_index=0,
                     shard_count=1)


@pytest.fixture(scope="module")
def bad_corpus(pcm_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = json.loads(pcm_corpus["list"].read_text().splitlines()[0])
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    sf.write(root / "empty.wav", np.zeros(0, np.int16), 16000)
    sf.write(root / "nan.wav", np.array([0.0, np.nan] * 4000, np.float32), 16000, subtype="FLOAT")
    long_wave, _, _ = decode_audio(good["wav"])
    sf.write(root / "long.wav", np.tile(long_wave, 6), 16000, subtype="PCM_16")  # > 800 frames
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"key": "no_txt", "wav": good["wav"]}),
        json.dumps(dict(good, key="corrupt", wav=str(root / "corrupt.wav"))),
        json.dumps(dict(good, key="empty", wav=str(root / "empty.wav"))),
        json.dumps(dict(good, key="nan", wav=str(root / "nan.wav"))),
        json.dumps(dict(good, key="long", wav=str(root / "long.wav"))),
        json.dumps(dict(good, key="missing_file", wav=str(root / "nope.wav"))),
        json.dumps(dict(good, key="none_label", txt="<None>")),
    ]
    raw = root / "data.list"
    raw.write_bytes(("\n".join(lines) + "\n").encode() + b'{"key": "latin1", "wav": "x", "txt": "caf\xe9"}\n')
    # a shard with a non-UTF-8 txt member, and a truncated shard
    shard = root / "bad.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in [("u1.txt", b"\xff\xfe bad"), ("u1.wav", open(good["wav"], "rb").read()),
                           ("u2.txt", b"hello"), ("u2.wav", open(good["wav"], "rb").read())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io
            tf.addfile(info, io.BytesIO(data))
    data = shard.read_bytes()
    (root / "trunc.tar").write_bytes(data[: int(len(data) * 0.6)])  # cut inside the second wav
    (root / "shards.list").write_text(f"{shard}\n{root / 'trunc.tar'}\n")
    return root


def test_bad_input_is_skipped_and_counted(pcm_corpus, bad_corpus, monkeypatch):
    from osum_jax.data import pipeline as pipeline_module

    decoded = []

    def spy(src, **kw):  # the real decoder, recording what it was asked to decode
        decoded.append(str(src))
        return decode_audio(src, **kw)

    monkeypatch.setattr(pipeline_module, "decode_audio", spy)
    cfg = cfg_for(pcm_corpus, num_epochs=1, spec_aug=False, spec_sub=False)
    pipe = DataPipeline(cfg, str(bad_corpus / "data.list"), shard_index=0, shard_count=1, train=False)
    assert pipe.index_skips == {"bad json line": 1, "missing field": 1, "non-utf8 text": 1}
    it = iter(pipe.dataset())
    batches = list(it)
    assert sum(int(b["num_real"]) for b in batches) == 1  # only the good line survives
    assert skip_counts(it.get_state()) == {"bad audio": 4, "too long": 1, "none label": 1}
    # an over-long file is rejected from its header, before it is decoded and resampled
    assert decoded and not any(d.endswith("long.wav") for d in decoded)
    spipe = DataPipeline(cfg, str(bad_corpus / "shards.list"), shard_index=0, shard_count=1, train=False)
    assert spipe.index_skips.get("unreadable tar", 0) >= 1
    it = iter(spipe.dataset())
    got = list(it)
    assert skip_counts(it.get_state()).get("non-utf8 text") == 2  # u1 in both tars
    assert sum(int(b["num_real"]) for b in got) >= 1


def test_strict_mode_names_the_culprit(pcm_corpus, bad_corpus):
    cfg = cfg_for(pcm_corpus, num_epochs=1, strict=True)
    with pytest.raises(SampleError, match=r"data\.list:2: bad json line"):
        DataPipeline(cfg, str(bad_corpus / "data.list"), shard_index=0, shard_count=1)
    lines = (bad_corpus / "data.list").read_text(errors="replace").splitlines()
    lst = bad_corpus / "strict.list"
    lst.write_text(lines[0] + "\n" + lines[3] + "\n")  # a good line, then the corrupt audio
    pipe = DataPipeline(cfg, str(lst), shard_index=0, shard_count=1, train=False)
    with pytest.raises(SampleError, match=r"strict\.list:2 \(key corrupt\): bad audio"):  # file, line, key
        list(pipe)


def test_tokenizer_matches_transformers(pcm_corpus):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer(pcm_corpus["tokenizer"])
    hf = PreTrainedTokenizerFast(tokenizer_file=str(pcm_corpus["tokenizer"] / "tokenizer.json"))
    for text in ["the quick brown fox<male>", "transcribe the speech into text.", "café 你好 <开始回答>"]:
        assert ours.encode(text) == hf.convert_tokens_to_ids(hf.tokenize(text))
    assert ours.eod_id == hf.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("raw, expected", [
    ("Hello World <ADULT> <MALE>", "hello world<adult><male>"),
    ("你 好 世 界 ok", "你好世界ok"),
    ("Answer < 开始回答 > Yes", "answer<开始回答>yes"),
])
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


def test_worker_processes_cover_the_data(pcm_corpus):
    cfg = cfg_for(pcm_corpus, num_epochs=1, num_workers=2)
    it = iter(DataPipeline(cfg, str(pcm_corpus["list"]), shard_index=0, shard_count=1).dataset())
    keys = [k for b in it for k in b["keys"][: b["num_real"]]]
    it.close()
    assert sorted(keys) == sorted(json.loads(line)["key"] for line in pcm_corpus["list"].read_text().splitlines())


def test_osum_data_cli(pcm_corpus, tmp_path, capsys):
    from osum_jax.data.cli import main

    assert main(["make-shards", str(pcm_corpus["list"]), str(tmp_path / "sh"), "--per-shard", "3",
                 "--workers", "2"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["shards"] == 4 and made["utterances"] == pcm_corpus["n"] and made["skipped"] == {}
    lst = tmp_path / "sh" / "shards_list.txt"
    assert main(["index", str(lst)]) == 0
    assert json.loads(capsys.readouterr().out)["utterances"] == pcm_corpus["n"]
    first_tar = lst.read_text().splitlines()[0]  # relative to the list: the folder can move
    assert first_tar == "shards_000000000.tar"
    idx = str(lst.parent / first_tar) + ".idx.json"
    mtime = __import__("os").stat(idx).st_mtime_ns  # built once and cached beside the tar
    assert main(["inspect", str(lst)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert __import__("os").stat(idx).st_mtime_ns == mtime
    assert info["utterances"] == pcm_corpus["n"] and info["tasks"]["<TRANSCRIBE> <GENDER>"] == 3
    assert 0 < info["hours"] < 0.02 and sum(info["length_histogram_seconds"].values()) == pcm_corpus["n"]
    assert main(["inspect", str(tmp_path / "missing.list")]) == 2
    assert "does not exist" in capsys.readouterr().err
