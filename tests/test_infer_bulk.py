"""osum-infer for long bulk runs (issue 34 item 4): results appended per utterance, --resume after SIGKILL,
--shard I/N + merge, --ray (Ray Data on a local Ray, 2 CPU actors), and the loop guard. The runs that are killed
are real processes killed with SIGKILL at a random point; the merged results must equal an uninterrupted run's
byte for byte."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from osum_torch_infer import bulk, cli
from osum_torch_infer.pipeline import Item, mark_repeated_keys
from tests.test_torch_infer_e2e import package  # noqa: F401 - the tiny package fixture (module scope)

ROOT = Path(__file__).resolve().parents[1]
DECODE = ["--device", "cpu", "--max-new-tokens", "24", "--batch-size", "2", "--no-progress"]


# -- the results file, shards and merge, without a model -----------------------------------------------------------


def test_shard_spec():
    assert bulk.parse_shard("0/1") == (0, 1) and bulk.parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "-1/2", "a/2", "1", "1/2/3", ""):
        with pytest.raises(ValueError, match="expected I/N"):
            bulk.parse_shard(bad)
    items = list(range(10))
    shards = [bulk.take_shard(items, i, 3) for i in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items


def test_records_file_torn_line_and_bad_lines(tmp_path):
    out = tmp_path / "r.jsonl"
    lines = [bulk.record_line({"key": k, "text": f"t {k}"}) for k in ("a", "b")]
    torn = b'{"key": "c", "te'
    out.write_bytes(b"".join(lines) + torn)
    rec = bulk.read_records(out, "jsonl")
    assert list(rec.lines) == ["a", "b"] and rec.torn == (3, len(torn)) and rec.size == len(b"".join(lines))
    items = [Item(k, f"{k}.wav") for k in "abcd"]
    todo, rec = bulk.resume_plan(out, items, "jsonl", "x.list")
    assert [it.key for it in todo] == ["c", "d"]
    # the journal keeps the complete lines and cuts the torn one off; a second writer is refused
    with bulk.Journal(out, keep=rec.size) as j:
        with pytest.raises(ValueError, match="being written by another process"):
            bulk.Journal(out, keep=None)
        j.write(bulk.record_line({"key": "c", "text": "t c"}))
    assert out.read_bytes() == b"".join(lines) + bulk.record_line({"key": "c", "text": "t c"})
    # a key this run does not have (another list or shard), a key twice, a broken complete line, another format
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}:3: key 'c' is not in this run's input \(y.list"):
        bulk.resume_plan(out, items[:2], "jsonl", "y.list")
    out.write_bytes(lines[0] + lines[1] + lines[0])
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}:3: key 'a' is already at line 1"):
        bulk.resume_plan(out, items, "jsonl", "x.list")
    out.write_bytes(lines[0] + b'{"key": "b"\n' + lines[1])
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}:2: broken JSON"):
        bulk.read_records(out)
    out.write_bytes(lines[0])
    with pytest.raises(ValueError, match="holds jsonl results, not text: pass --format jsonl"):
        bulk.read_records(out, "text")
    txt = tmp_path / "r.txt"
    txt.write_bytes(b"a\tone\nb\ttwo\nc\tth")
    rec = bulk.read_records(txt, "text")
    assert list(rec.lines) == ["a", "b"] and rec.torn == (3, 4)


def test_repeated_keys_get_records_of_their_own(tmp_path):
    """A key used twice: its later use is an error record under its file:line, so every record's key is unique
    (what --resume and merge match by)."""
    items = [Item("a", "a.wav", where="l:1"), Item("l:3", "", where="l:3", error="l:3: broken JSON"),
             Item("a", "b.wav", where="l:3"), Item("b", "c.wav", where="l:4"), Item("a", "d.wav")]
    mark_repeated_keys(items, strict=False)
    assert [it.key for it in items] == ["a", "l:3", "l:3#2", "b", "d.wav"]
    assert items[2].error.startswith("l:3: key 'a' is used twice (l:1 and l:3)")
    mark_repeated_keys(items, strict=False)  # idempotent
    assert [it.key for it in items] == ["a", "l:3", "l:3#2", "b", "d.wav"]
    with pytest.raises(ValueError, match="used twice"):
        mark_repeated_keys([Item("a", "a.wav"), Item("a", "b.wav")], strict=True)


def _write_list(path: Path, keys) -> None:
    path.write_text("".join(json.dumps({"key": k, "wav": f"{k}.wav"}) + "\n" for k in keys))


def test_merge_checks_every_key(tmp_path, capsys):
    keys = [f"u{i}" for i in range(7)]
    data = tmp_path / "data.list"
    _write_list(data, keys)
    recs = {k: {"key": k, "wav": f"{k}.wav", "text": f"text {k}"} for k in keys}
    recs["u4"] = {"key": "u4", "wav": "u4.wav", "error": "cannot decode audio"}
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.jsonl")
        shards[-1].write_bytes(b"".join(bulk.record_line(recs[k]) for k in bulk.take_shard(keys, i, 3)))
    out = tmp_path / "merged.jsonl"
    # any order of the shards; exit status 1: a record is a failed file
    assert cli.main(["merge", str(out), str(shards[2]), str(shards[0]), str(shards[1]), "--data", str(data)]) == 1
    assert out.read_bytes() == b"".join(bulk.record_line(recs[k]) for k in keys)
    assert "7 result(s) from 3 file(s)" in capsys.readouterr().err
    assert cli.main(["merge", str(out), *map(str, shards), "--data", str(data)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    txt = tmp_path / "merged.txt"
    assert cli.main(["merge", str(txt), *map(str, shards), "--data", str(data), "--format", "text"]) == 1
    assert txt.read_text().splitlines() == [f"{k}\ttext {k}" for k in keys if k != "u4"]
    capsys.readouterr()

    def refused(*shard_files, data_file=data):
        bad = tmp_path / "bad.jsonl"
        assert cli.main(["merge", str(bad), *map(str, shard_files), "--data", str(data_file)]) == 2
        assert not bad.exists()  # nothing written
        return capsys.readouterr().err

    err = refused(shards[0], shards[1])  # a shard left out
    assert f"key 'u2' ({data}:3) is in no shard" in err and f"key 'u5' ({data}:6) is in no shard" in err
    err = refused(shards[0], shards[1], shards[2], shards[0])  # a shard twice
    assert f"key 'u0' is in {shards[0]}:1 and in {shards[0]}:1" in err
    short = tmp_path / "short.list"
    _write_list(short, keys[:5])
    err = refused(*shards, data_file=short)  # shards of another list
    assert f"{shards[2]}:2: key 'u5' is not in {short}" in err
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(shards[1].read_bytes()[:-5])
    err = refused(shards[0], torn, shards[2])
    assert f"{torn}:2: a torn last line: this shard was interrupted" in err and "key 'u4'" in err
    text_shard = tmp_path / "s.txt"
    text_shard.write_text("u0\tx\n")
    assert "merge needs jsonl shards" in refused(text_shard)


def test_usage_errors_are_one_line(tmp_path, capsys):
    """Bad --shard / loop-guard / resume flags: one line, exit status 2, before any package or audio is read."""
    data = tmp_path / "data.list"
    _write_list(data, ["a", "b"])
    out = tmp_path / "o.jsonl"
    base = ["--model", str(tmp_path / "no-package"), "--data", str(data), "--out", str(out)]
    for extra, message in ((["--shard", "2/2"], "--shard '2/2': expected I/N"),
                           (["--shard", "x"], "--shard 'x': expected I/N"),
                           (["--loop-repeats", "1"], "--loop-repeats must be 0 (off) or >= 2"),
                           (["--loop-max-ngram", "0"], "--loop-max-ngram must be an integer >= 1"),
                           (["--no-repeat-ngram-size", "0"], "--no-repeat-ngram-size must be an integer >= 1"),
                           (["--ray-actors", "0"], "--ray-actors must be >= 1")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()
    out.write_text("")
    assert cli.main(base) == 2
    assert "pass --resume to finish it or --overwrite to replace it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: not both
        cli.main(base + ["--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# -- real runs on the tiny package ---------------------------------------------------------------------------------


def _osum_infer(*args: str) -> list[str]:
    return [sys.executable, "-m", "osum_torch_infer.cli", *args]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _run(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_osum_infer(*args), capture_output=True, text=True, env={**_ENV, **(env or {})}, cwd=ROOT,
                          timeout=timeout)


def _kill_midway(args: list[str], out: Path, rng: random.Random, total: int) -> int:
    """Start osum-infer, SIGKILL it once ``out`` has a random number of lines (and a random moment more), and
    return how many complete lines it had written."""
    at = rng.randint(1, total // 2)
    proc = subprocess.Popen(_osum_infer(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV,
                            cwd=ROOT)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= at:
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed (rc {proc.returncode})"
    done = out.read_bytes().count(b"\n")
    assert 1 <= done < total, f"killed with {done} of {total} results written"
    return done


@pytest.fixture(scope="module")
def bulk_run(speech_corpus, package, tmp_path_factory):  # noqa: F811 - package is the e2e fixture
    """A 41-utterance list (the corpus' 10 recordings 4 times over under new keys, and one unreadable file) and the
    results of one uninterrupted run of it. The recordings are cut or padded to one length: osum-infer decodes a
    chunk's utterances longest first and writes results in input order, so with equal lengths results come one
    batch at a time, and a kill after a random number of lines lands in the middle of the run."""
    import soundfile as sf

    tmp = tmp_path_factory.mktemp("bulk")
    (tmp / "broken.wav").write_bytes(b"RIFF0000WAVEnot really audio")
    entries = []
    for e in speech_corpus["entries"]:
        x, sr = sf.read(e["wav"], dtype="float32")
        x = (x if x.ndim == 1 else x.mean(axis=1))[:3 * sr]
        path = tmp / f"{e['key']}.wav"
        sf.write(path, np.pad(x, (0, 3 * sr - len(x))), sr)  # 3 s
        entries.append({"key": e["key"], "wav": str(path), "task": e.get("task") or "<TRANSCRIBE>"})
    entries = [dict(e, key=f"{e['key']}-{r}") for r in range(4) for e in entries]
    entries.insert(5, {"key": "broken", "wav": str(tmp / "broken.wav")})
    data = tmp / "data.list"
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    full = tmp / "full.jsonl"
    r = _run("--model", str(package), "--data", str(data), "--out", str(full), *DECODE)
    assert r.returncode == 1, r.stderr  # the broken file
    lines = full.read_bytes().splitlines()
    assert [json.loads(x)["key"] for x in lines] == [e["key"] for e in entries]
    return {"data": data, "full": full, "n": len(entries), "tmp": tmp, "package": package}


@pytest.mark.slow
def test_sigkill_resume_and_merge_equal_an_uninterrupted_run(bulk_run):
    """Two shards, each SIGKILLed at a random point and resumed (one with a torn last line as a cut-off write
    leaves it), merged: byte for byte the uninterrupted run's results."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    tmp, data, pkg = bulk_run["tmp"], str(bulk_run["data"]), str(bulk_run["package"])
    shards = []
    for i in range(2):
        out = tmp / f"shard{i}.jsonl"
        args = ["--model", pkg, "--data", data, "--out", str(out), "--shard", f"{i}/2", *DECODE]
        total = len(range(i, bulk_run["n"], 2))
        done = _kill_midway(args, out, rng, total)
        torn = b'{"key": "utt3-2", "wav": "/some/wh'
        if i == 1:  # what a write cut off by the kill leaves: part of a line, no line break
            with open(out, "ab") as f:
                f.write(torn)
        again = _run(*args)
        assert again.returncode == 2 and "pass --resume" in again.stderr  # never silently overwritten
        r = _run(*args, "--resume")
        assert r.returncode in (0, 1), f"seed {seed}: {r.stderr}"
        assert f"resuming {out}: {done} of {total} utterance(s) done, {total - done} to go" in r.stderr, r.stderr
        if i == 1:
            assert f"{out}:{done + 1}: a torn last line ({len(torn)} bytes" in r.stderr, r.stderr
        shards.append(out)
    r = _run("--model", pkg, "--data", data, "--out", str(shards[1]), "--shard", "1/2", "--resume", *DECODE)
    assert r.returncode == 1 and "nothing to do" in r.stderr  # finished: nothing decoded again; 1: the broken file
    assert "1 file(s) failed" in r.stderr and "Loading weights" not in r.stderr  # the package is not even loaded
    merged = tmp / "merged.jsonl"
    r = _run("merge", str(merged), str(shards[1]), str(shards[0]), "--data", data)
    assert r.returncode == 1, r.stderr  # the broken file's record
    assert merged.read_bytes() == bulk_run["full"].read_bytes(), f"kill points from seed {seed}"


@pytest.mark.slow
def test_ray_data_job_resumes_the_same_way(bulk_run):
    """osum-infer --ray on a local Ray with 2 CPU actors, resuming a file that holds some results and a torn line:
    the same bytes as the plain uninterrupted run."""
    tmp, full = bulk_run["tmp"], bulk_run["full"].read_bytes()
    out = tmp / "ray.jsonl"
    keep = b"".join(full.splitlines(keepends=True)[:7])
    out.write_bytes(keep + b'{"key": "utt7-0"')
    r = _run("--model", str(bulk_run["package"]), "--data", str(bulk_run["data"]), "--out", str(out), *DECODE,
             "--resume", "--ray", "--ray-address", "local", "--ray-actors", "2", timeout=420,
             env={"RAY_DEDUP_LOGS": "0"})  # Ray shows one actor's lines when both print the same ones
    assert r.returncode == 1, r.stderr[-4000:]  # the broken file
    assert f"resuming {out}: 7 of {bulk_run['n']} utterance(s) done" in r.stderr
    assert f"Ray Data, 2 actor(s) on cpu, {bulk_run['n'] - 7} utterance(s)" in r.stderr
    # each actor loads the package once: two actor processes, as Ray labels their output
    actors = set(re.findall(r"MapBatches\(Decoder\)\) pid=(\d+)", r.stderr))
    assert len(actors) == 2, r.stderr[-4000:]
    assert out.read_bytes() == full


# -- the repetition guard ------------------------------------------------------------------------------------------


def _reference_guard(tokens: list[int], repeats: int, max_ngram: int) -> list[int]:
    """Where decoding with the guard stops, found by scanning the unguarded tokens one by one: at the first token
    that completes ``repeats`` copies of an n-gram (n <= max_ngram), keeping one copy."""
    for t in range(1, len(tokens) + 1):
        for n in range(1, max_ngram + 1):
            tail = tokens[max(0, t - n * repeats):t]
            if len(tail) == n * repeats and all(tail[j] == tail[j % n] for j in range(len(tail))):
                return tokens[:t - n * (repeats - 1)]
    return tokens


def test_loop_guard_detector():
    import torch

    from osum_torch_infer.decoding import loop_ngram, looping_rows, trim_loop

    rows = [[5, 1, 2, 1, 2, 1, 2], [9, 9, 9, 9, 4, 4, 4], [3, 1, 2, 3, 1, 2, 3], [7, 3, 3, 3, 3, 3, 3]]
    assert [loop_ngram(r, 3, 4) for r in rows] == [2, 1, 0, 1]
    assert looping_rows(torch.tensor(rows), 3, 4).tolist() == [True, True, False, True]
    assert looping_rows(torch.tensor(rows), 4, 4).tolist() == [False, False, False, True]
    assert trim_loop(rows[0], 3, 4) == [5, 1, 2] and trim_loop(rows[2], 3, 4) == rows[2]  # 2 copies + 1
    assert [_reference_guard(r, 3, 4) for r in rows] == [[5, 1, 2], [9], rows[2], [7, 3]]


def test_loop_guard_on_looping_output(speech_corpus, package):  # noqa: F811
    """The tiny random model loops (e.g. one token over and over): with the guard, each window stops at the first
    loop of 4 copies and keeps one; the other rows of the batch are unaffected; both engines and beam search."""
    from osum_torch_infer import OSUMForConditionalGeneration
    from osum_torch_infer.pipeline import read_list, _prepare

    model = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")
    items = read_list(speech_corpus["list"])[:4]
    units = [_prepare(model, it, "<TRANSCRIBE>", None, 30.0)[0] for it in items]
    feats = np.zeros((len(units), max(u.feats.shape[0] for u in units), 80), np.float32)
    for j, u in enumerate(units):
        feats[j, :u.feats.shape[0]] = u.feats
    lengths, prompts = [u.feats.shape[0] for u in units], [u.prompt_ids for u in units]
    free = model.generate(feats, lengths, prompts, max_new_tokens=48)
    want = [_reference_guard(t, 4, 6) for t in free]
    assert sum(len(w) < len(t) for w, t in zip(want, free)) >= 2, f"the tiny model no longer loops: {free}"
    for engine in ("fast", "hf"):
        got = model.generate(feats, lengths, prompts, max_new_tokens=48, engine=engine, loop_repeats=4,
                             loop_max_ngram=6)
        assert got == want, engine
    one = model.generate(feats[:1, :lengths[0]], lengths[:1], prompts[:1], max_new_tokens=48, loop_repeats=4,
                         loop_max_ngram=6)
    assert one == want[:1]
    beam = model.generate(feats, lengths, prompts, decoding="beam", max_new_tokens=48, loop_repeats=4,
                          loop_max_ngram=6)
    assert all(_reference_guard(t, 4, 6) == t for t in beam)  # no beam kept a loop of 4 copies
    # transformers' no_repeat_ngram_size: no 3-gram twice in a row's output (the free output has some)

    def repeated_3grams(t):
        grams = [tuple(t[i:i + 3]) for i in range(len(t) - 2)]
        return len(grams) - len(set(grams))

    assert any(repeated_3grams(t) for t in free)
    nr = model.generate(feats, lengths, prompts, max_new_tokens=48, no_repeat_ngram_size=3)
    assert not any(repeated_3grams(t) for t in nr)


def test_loop_guard_flags_reach_decoding(speech_corpus, package, tmp_path):  # noqa: F811
    """--loop-repeats / --loop-max-ngram / --no-repeat-ngram-size through osum-infer: the guarded texts are what
    generate gives with the same settings."""
    from osum_torch_infer import OSUMForConditionalGeneration

    root = speech_corpus["root"]
    wavs = [str(root / f"utt{i}.wav") for i in range(3)]
    base = ["--model", str(package), "--wav", *wavs, "--task", "<TRANSCRIBE>", "--max-new-tokens", "40",
            "--device", "cpu", "--no-progress"]
    texts = {}
    for name, extra in (("free", []), ("guard", ["--loop-repeats", "3", "--loop-max-ngram", "4"]),
                        ("norepeat", ["--no-repeat-ngram-size", "2"])):
        out = tmp_path / f"{name}.jsonl"
        assert cli.main(base + extra + ["--out", str(out)]) == 0
        texts[name] = [json.loads(x)["text"] for x in out.read_text().splitlines()]
    model = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")
    from osum_torch_infer.pipeline import _prepare

    for i, w in enumerate(wavs):
        u = _prepare(model, Item(Path(w).stem, w), "<TRANSCRIBE>", None, 30.0)[0]
        args = (u.feats[None], [u.feats.shape[0]], [u.prompt_ids])
        for name, kw in (("free", {}), ("guard", dict(loop_repeats=3, loop_max_ngram=4)),
                         ("norepeat", dict(no_repeat_ngram_size=2))):
            assert texts[name][i] == model.decode_text(model.generate(*args, max_new_tokens=40, **kw)[0]), name
    assert texts["guard"] != texts["free"] and texts["norepeat"] != texts["free"]
