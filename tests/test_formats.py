"""Issue 33, item 3: each file format has one reader (osum_torch_infer.formats), and the training side and the
runtime read the same things from the same files: tar shards (a damaged tar keeps the utterances before the
damage on both sides), data lists (one bad line costs that line, named file:line), the prompt book
(``<no_prompt>`` is an empty prompt on both sides), and the one atomic write (a directory too)."""

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import write_tar


def _wav(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32),
             16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _shard(path, n: int = 3):
    members = []
    for i in range(n):
        members += [(f"u{i}.wav", _wav(0.3, i)), (f"u{i}.txt", b"hello"), (f"u{i}.task", b"<TRANSCRIBE>")]
    members += [("noaudio.txt", b"x")]  # a key without audio: a problem on both sides, named tar:key
    write_tar(path, members)
    return path


def test_training_and_runtime_read_the_same_utterances_from_a_shard(tmp_path):
    from osum_jax.data.shards import TarShardSource
    from osum_torch_infer.pipeline import read_any

    tar = _shard(tmp_path / "s.tar")
    (tmp_path / "shards_list.txt").write_text("s.tar\n")
    src = TarShardSource(tmp_path / "shards_list.txt", cache_dir=str(tmp_path / "cache"))
    items = read_any(tmp_path / "shards_list.txt")
    good = [it for it in items if it.error is None]
    assert [src[i]["key"] for i in range(len(src))] == [it.key for it in good] == ["u0", "u1", "u2"]
    for i, it in enumerate(good):  # the runtime reads the audio member the training side reads
        t, off, size = it.member
        with open(t, "rb") as f:
            f.seek(off)
            assert f.read(size) == src[i]["audio"]
        assert it.task == src[i]["task"] == "<TRANSCRIBE>"
    assert [it.error for it in items if it.error] == [f"{tar}:noaudio: no audio member"]
    assert src.index_skips.counts["missing field"] == 1

    # a tar cut inside its third utterance: both sides keep the two complete ones and name the damage
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        third = next(m for m in tf.getmembers() if m.name == "u2.wav")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:third.offset_data + 100])
    src = TarShardSource([str(cut)], cache_dir=str(tmp_path / "cache"))
    items = read_any(cut)
    assert [src[i]["key"] for i in range(len(src))] == [it.key for it in items if it.error is None]
    assert [it.key for it in items if it.error is None] == ["u0", "u1"]
    errors = sorted(it.error for it in items if it.error)
    assert errors[0].startswith(f"{cut}: unreadable tar (damaged after 3 utterances")
    assert errors[1] == f"{cut}:u2: unreadable tar (member data is truncated)" and len(errors) == 2
    assert sorted(src.index_skips.examples["unreadable tar"]) == [e.replace(" (", ": ", 1)[:-1] for e in errors]
    with pytest.raises(ValueError, match="unreadable tar"):
        read_any(cut, strict=True)


def test_a_bad_data_list_line_costs_that_line_on_both_sides(tmp_path):
    from osum_jax.data.sources import RawListSource
    from osum_torch_infer.pipeline import read_list

    wav = tmp_path / "a.wav"
    wav.write_bytes(_wav(0.2, 0))
    lst = tmp_path / "data.list"
    lst.write_bytes(b"".join([json.dumps({"key": "a", "wav": "a.wav", "txt": "x"}).encode() + b"\n",
                              b"{broken\n", b"\n", b"\xff\xfe not utf-8\n",
                              json.dumps({"key": "b", "wav": "a.wav", "txt": "y"}).encode() + b"\r\n"]))
    src = RawListSource(lst, cache_dir=str(tmp_path / "cache"))
    assert [src[i]["key"] for i in range(len(src))] == ["a", "b"]
    assert [(n, r) for n, r, _ in src.bad_lines] == [(2, "bad json line"), (4, "non-utf8 text")]
    items = read_list(lst)
    assert [it.key for it in items if it.error is None] == ["a", "b"]
    errors = [it.error for it in items if it.error]
    assert errors[0].startswith(f"{lst}:2: broken JSON") and errors[1] == f"{lst}:4: the line is not UTF-8"
    with pytest.raises(ValueError, match=f"{lst}:2: "):
        read_list(lst, strict=True)


def test_the_prompt_book_means_the_same_on_both_sides(tmp_path):
    from osum_jax.data.text import PromptBook
    from osum_torch_infer.formats import prompts
    from osum_torch_infer.package import PackageError, read_prompts

    f = tmp_path / "prompts.yaml"
    f.write_text('"<TRANSCRIBE><GENDER>": ["<no_prompt>"]\n"<TRANSCRIBE>": "say it"\n')
    book = PromptBook.load(f)
    assert book.prompts == read_prompts(tmp_path) == {"<TRANSCRIBE> <GENDER>": ["<no_prompt>"],
                                                      "<TRANSCRIBE>": ["say it"]}
    assert {book.choose("<TRANSCRIBE><GENDER>", 0, 0, i) for i in range(5)} == {""}
    assert prompts.first(book.prompts, "<TRANSCRIBE> <GENDER>") == ""
    assert prompts.first(book.prompts, None) == "say it"  # no task: <TRANSCRIBE>
    with pytest.raises(ValueError, match=r"'<NOPE>' is not in the package's prompt file; known tasks"):
        prompts.first(book.prompts, "<NOPE>")
    f.write_text('"<TRANSCRIBE>": []\n')
    with pytest.raises(ValueError, match=f"{f}: task '<TRANSCRIBE>' must have a non-empty list"):
        PromptBook.load(f)
    with pytest.raises(PackageError, match=f"{f}: task"):
        read_prompts(tmp_path)


def test_one_atomic_write_for_files_and_directories(tmp_path):
    from osum_jax.checkpoint import atomic_output
    from osum_torch_infer.files import atomic_file

    out = tmp_path / "pkg"
    with atomic_file(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("one")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with pytest.raises(RuntimeError):  # a failed rewrite leaves the old directory whole, no temporary behind
        with atomic_file(out) as tmp:
            tmp.mkdir()
            (tmp / "b").write_text("two")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"] and (out / "a").read_text() == "one"
    with atomic_output(out, force=True) as tmp:  # the checkpoint writer's: the same helper, an existing dir swapped
        tmp.mkdir()
        (tmp / "b").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_output(out, force=False):
            pass
