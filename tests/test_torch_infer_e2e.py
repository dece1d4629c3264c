"""CPU end to end on real speech (espeak-ng): JAX model -> torch package -> osum-infer -> results.jsonl ->
osum-eval report. A random tiny model writes garbage text; the pipeline, the result fields and the report
structure are what is checked here (scoring numbers are checked by hand in test_torch_infer_runtime.py)."""

import json

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from osum_jax.convert.torch_package import export_torch_package
from osum_jax.models import OSUM
from osum_torch_infer import cli, evaluate
from tests.helpers import tiny_model_config


@pytest.fixture(scope="module")
def package(speech_corpus, tmp_path_factory):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(speech_corpus["tokenizer"] / "tokenizer.json")).get_vocab_size()
    cfg = tiny_model_config(**{"llm.vocab_size": vocab})
    model = OSUM(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":
            var.set_value(0.2 * rng.standard_normal(var.shape).astype(np.float32))
    out = tmp_path_factory.mktemp("e2e") / "pkg"
    export_torch_package(model, cfg, out, tokenizer_dir=speech_corpus["tokenizer"], dtype="fp32", progress=False)
    return out


def test_infer_then_eval(speech_corpus, package, tmp_path, capsys):
    root = speech_corpus["root"]
    entries = [dict(e) for e in speech_corpus["entries"]]
    # a recording longer than 30 s (split into two windows) and an unreadable file
    x, sr = sf.read(root / "utt3.wav", dtype="float32")
    long = np.tile(x, int(np.ceil(31 * sr / len(x))))[:int(31.5 * sr)]
    sf.write(tmp_path / "long.wav", long, sr)
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEnot really audio")
    entries += [{"key": "long", "wav": str(tmp_path / "long.wav"), "txt": "PLEASE CALL STELLA", "task": "<TRANSCRIBE>"},
                {"key": "broken", "wav": str(tmp_path / "broken.wav"), "txt": "X"}]
    data = tmp_path / "data.list"
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    results = tmp_path / "results.jsonl"
    rc = cli.main(["--model", str(package), "--data", str(data), "--out", str(results), "--batch-size", "4",
                   "--max-new-tokens", "6", "--device", "cpu", "--no-progress"])
    assert rc == 1  # one file could not be read; all others were processed
    err = capsys.readouterr().err
    assert "broken" in err and "cannot decode audio" in err
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["key"] for r in rows] == [e["key"] for e in entries]  # input order kept
    by_key = {r["key"]: r for r in rows}
    assert set(by_key["broken"]) == {"key", "wav", "task", "prompt", "error"}
    assert by_key["long"]["windows"] == 2 and by_key["utt0"]["windows"] == 1
    for r in rows:
        if r["key"] == "broken":
            continue
        assert isinstance(r["text"], str) and isinstance(r["transcript"], str) and isinstance(r["tags"], dict)
        assert set(r["tags"]) <= {"gender", "age"}
    assert by_key["utt5"]["task"] == "<TRANSCRIBE> <AGE> <GENDER>" and by_key["utt4"]["task"] == "<TRANSCRIBE>"
    # batching does not change results (greedy): batch size 1 gives the same texts
    single = tmp_path / "single.txt"
    assert cli.main(["--model", str(package), "--wav", str(root / "utt1.wav"), str(root / "utt2.wav"),
                     "--task", "<TRANSCRIBE><GENDER>", "--batch-size", "1", "--max-new-tokens", "6",
                     "--format", "text", "--out", str(single), "--no-progress"]) == 0
    texts = dict(line.split("\t", 1) for line in single.read_text().splitlines())
    assert texts["utt1"] == by_key["utt1"]["text"]  # same task as in the list, batch 4 vs batch 1
    # refused before any audio is read, nothing written: windows the encoder cannot take, keys used twice
    bad = tmp_path / "bad.jsonl"
    for extra in (["--max-seconds", "0"], ["--max-seconds", "40"]):
        assert cli.main(["--model", str(package), "--wav", str(root / "utt1.wav"), "--out", str(bad),
                         "--no-progress", *extra]) == 2
        assert "max_seconds" in capsys.readouterr().err and not bad.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "utt1.wav").write_bytes((root / "utt1.wav").read_bytes())
    assert cli.main(["--model", str(package), "--wav", str(root / "utt1.wav"), str(tmp_path / "other" / "utt1.wav"),
                     "--out", str(bad), "--no-progress", "--strict"]) == 2
    assert "used twice" in capsys.readouterr().err and not bad.exists()
    # without --strict the repeated key costs only its second use (an error record), exit status 1
    assert cli.main(["--model", str(package), "--wav", str(root / "utt1.wav"), str(tmp_path / "other" / "utt1.wav"),
                     "--out", str(bad), "--no-progress", "--max-new-tokens", "2"]) == 1
    rows = [json.loads(line) for line in bad.read_text().splitlines()]
    assert "error" not in rows[0] and "used twice" in rows[1]["error"]
    bad.unlink()
    capsys.readouterr()
    # osum-eval on the data.list as reference: one report per task
    report_dir = tmp_path / "report"
    assert evaluate.main(["--ref", str(data), "--hyp", str(results), "--out", str(report_dir)]) == 0
    rep = json.loads((report_dir / "report.json").read_text())
    assert sorted(rep["tasks"]) == ["<TRANSCRIBE>", "<TRANSCRIBE> <AGE> <GENDER>", "<TRANSCRIBE> <GENDER>"]
    assert rep["missing_hyp"] == ["broken"]
    assert rep["tasks"]["<TRANSCRIBE>"]["utterances"] == 7  # utt2, utt3, utt4, utt6, stereo, segment, long
    for task, r in rep["tasks"].items():
        assert r["wer"]["ref_tokens"] > 0 and r["wer"]["rate"] >= 0 and r["cer"]["ref_tokens"] > 0
    gender = rep["tasks"]["<TRANSCRIBE> <GENDER>"]["tags"]["gender"]
    assert gender["total"] == 3 and sum(map(sum, gender["confusion"])) == 3
    assert (report_dir / "transcribe_gender.gender.confusion.png").is_file()
    assert set(rep["tasks"]["<TRANSCRIBE> <AGE> <GENDER>"]["tags"]) == {"age", "gender"}
    # usage errors are reported with exit status 2
    assert cli.main(["--model", str(tmp_path), "--wav", "x.wav", "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["--model", str(package), "--wav", "x.wav", "--task", "<NOPE>", "--out", str(tmp_path / "o")]) == 2
    assert "known tasks" in capsys.readouterr().err


def test_one_bad_line_costs_only_itself(speech_corpus, package, tmp_path, capsys):
    """Non-UTF-8, broken JSON, no wav, a missing file, an unknown task and a repeated key: each line gets an
    error record naming file:line (or the file), the good lines are decoded, exit status 1; --strict refuses the
    list at its first bad line; --out naming a directory is refused before any audio is read."""
    root = speech_corpus["root"]
    whole = (root / "utt1.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 3])  # the header still promises the whole file
    good = {"key": "g1", "wav": str(root / "utt1.wav")}
    lines = [json.dumps(good).encode(), b'{"key": "x", "wav": "caf\xe9.wav"}', b'{"key": "y", "wav": ',
             b'{"key": "z"}', json.dumps({"key": "m", "wav": str(tmp_path / "missing.wav")}).encode(),
             json.dumps({"key": "t", "wav": str(root / "utt2.wav"), "task": "<NOPE>"}).encode(),
             json.dumps({"key": "g1", "wav": str(root / "utt2.wav")}).encode(),
             json.dumps({"key": "g2", "wav": str(root / "utt2.wav")}).encode(),
             json.dumps({"key": "cut", "wav": str(tmp_path / "cut.wav")}).encode()]
    data = tmp_path / "mixed.list"
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "r.jsonl"
    args = ["--model", str(package), "--data", str(data), "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]
    assert cli.main(args + ["--out", str(out)]) == 1
    assert "osum-infer: cpu, float32 (requested)" in capsys.readouterr().err  # what it runs on, said at load
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9
    ok = [r["key"] for r in rows if "error" not in r]
    assert ok == ["g1", "g2"]
    errors = [r["error"] for r in rows if "error" in r]
    assert f"{data}:2: the line is not UTF-8" in errors[0]
    assert f"{data}:3: broken JSON" in errors[1]
    assert f"{data}:4: no 'wav' field" in errors[2]
    assert errors[3] == f"{data}:5 (key m): no such file: {tmp_path / 'missing.wav'}"  # every error: file:line
    assert errors[4].startswith(f"{data}:6 (key t): ") and "'<NOPE>' is not in the package's prompt file" in errors[4]
    assert f"{data}:7" in errors[5] and "used twice" in errors[5]
    assert errors[6].startswith(f"{data}:9 (key cut): truncated audio: the WAV header promises")
    capsys.readouterr()
    strict = tmp_path / "strict.jsonl"
    assert cli.main(args + ["--out", str(strict), "--strict"]) == 2
    assert f"{data}:2: the line is not UTF-8" in capsys.readouterr().err and not strict.exists()
    (tmp_path / "adir").mkdir()
    assert cli.main(args + ["--out", str(tmp_path / "adir")]) == 2
    assert "is a directory" in capsys.readouterr().err
