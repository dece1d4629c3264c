"""The runtime's pieces without a model: import hygiene, log-mel parity, devices, parsing, scoring, osum-eval."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from osum_torch_infer import evaluate, scoring
from osum_torch_infer.parsing import join_windows, normalize_task, parse_output


def _run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_imports_never_pull_in_jax_and_scoring_needs_no_torch():
    out = _run_python(
        "import sys, osum_torch_infer\n"
        "from osum_torch_infer import scoring, parsing, evaluate\n"
        "print('torch' in sys.modules, 'jax' in sys.modules)\n"
        "from osum_torch_infer import OSUMForConditionalGeneration\n"
        "import osum_torch_infer.cli, osum_torch_infer.pipeline, osum_torch_infer.onnx_export\n"
        "print('torch' in sys.modules, any(m.split('.')[0] in ('jax', 'flax', 'osum_jax') for m in sys.modules))\n")
    assert out.split() == ["False", "False", "True", "False"]


def test_training_and_serving_share_one_front_end():
    """The JAX pipeline computes features with this runtime's functions (tested against transformers'
    WhisperFeatureExtractor in test_data_audio), and importing them pulls in neither torch nor JAX."""
    from osum_jax.data import audio as jax_side
    from osum_torch_infer import features

    assert jax_side.log_mel_spectrogram is features.log_mel_spectrogram
    assert jax_side.decode_audio is features.decode_audio and jax_side.AudioError is features.AudioError
    out = _run_python("import sys, osum_torch_infer.features\n"
                      "print(any(m.split('.')[0] in ('torch', 'jax', 'osum_jax') for m in sys.modules))\n")
    assert out.split() == ["False"]


def test_devices_and_dtypes():
    import torch

    from osum_torch_infer.devices import npu_available, resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "npu" if npu_available() else "cpu")
    if not npu_available():
        with pytest.raises(RuntimeError, match="torch_npu"):
            resolve_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="requested but"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.float32
    assert resolve_dtype("fp16", cpu, "bfloat16") == torch.float16
    assert resolve_dtype("bf16", cpu, "float16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", cpu, "bfloat16")


def test_task_aware_parsing():
    r = parse_output("the weather is nice<adult><female>", "<TRANSCRIBE><AGE><GENDER>")
    assert r == {"tags": {"age": "adult", "gender": "female"}, "transcript": "the weather is nice"}
    # unknown vocabulary falls back to the task's order
    assert parse_output("hi<mystery>", "<TRANSCRIBE> <EMOTION>")["tags"] == {"emotion": "mystery"}
    assert parse_output("<female><child>", "<AGE> <GENDER>") == {"tags": {"age": "child", "gender": "female"},
                                                                 "transcript": ""}
    r = parse_output("你好<0.0,0.3>world<0.3,1.25>", "<TRANSCRIBE> <ALIGN>")
    assert r["timestamps"] == [{"token": "你好", "start": 0.0, "end": 0.3},
                               {"token": "world", "start": 0.3, "end": 1.25}]
    assert r["transcript"] == "你好 world" and r["tags"] == {}
    r = parse_output("what time is it<开始回答>it is noon", "<TRANSCRIBE> <S2TCHAT>")
    assert (r["transcript"], r["answer"]) == ("what time is it", "it is noon")
    assert normalize_task("<TRANSCRIBE><GENDER>") == "<TRANSCRIBE> <GENDER>" == normalize_task(" <TRANSCRIBE>  <GENDER>")
    j = join_windows([(0.0, "a<0.0,0.5>"), (30.0, "b<0.1,0.4>")], "<TRANSCRIBE> <ALIGN>")
    assert j["transcript"] == "a b" and j["timestamps"][1] == {"token": "b", "start": 30.1, "end": 30.4}
    j = join_windows([(0.0, "one<happy>"), (20.0, "two<sad>"), (40.0, "three<sad>")], "<TRANSCRIBE> <EMOTION>")
    assert j["transcript"] == "one two three" and j["tags"] == {"emotion": "sad"}
    assert join_windows([(0.0, "你好"), (30.0, "世界")], "<TRANSCRIBE>")["transcript"] == "你好世界"


@pytest.mark.parametrize("task,windows,ref", [
    ("<TRANSCRIBE> <ALIGN>", [(0.0, "hello<0.0,0.5>world<0.5,1.0>"), (20.0, "again<0.1,0.6>")],
     "hello<0.0,0.5>world<0.5,1.0>again<20.1,20.6>"),
    ("<TRANSCRIBE> <EMOTION>", [(0.0, "one<happy>"), (20.0, "two<sad>"), (40.0, "three<sad>")], "one two three<sad>"),
    ("<TRANSCRIBE> <AGE> <GENDER>", [(0.0, "a<adult><male>"), (20.0, "b<child><male>"), (40.0, "c<child><female>")],
     "a b c<child><male>"),
    ("<TRANSCRIBE> <S2TCHAT>", [(0.0, "你好<开始回答>嗨"), (30.0, "世界<开始回答>在")], "你好世界<开始回答>嗨 在"),
    ("<AGE> <GENDER>", [(0.0, "<old><female>"), (30.0, "<old><male>"), (60.0, "<adult><female>")], "<old><female>"),
])
def test_joined_windows_score_like_their_fields(task, windows, ref):
    """A long recording's result ``text`` re-parses to its joined fields (shifted SRWT stamps, majority tags, one
    answer separator), so osum-eval scores a perfect multi-window hypothesis as perfect; the raw window outputs
    are kept in ``window_texts``."""
    j = join_windows(windows, task)
    assert j["window_texts"] == [t for _, t in windows]
    again = parse_output(j["text"], task)
    assert {k: again[k] for k in again} == {k: j[k] for k in again}
    report = scoring.score({"u": ref}, {"u": j["text"]}, {"u": task})["tasks"][normalize_task(task)]
    for metric in ("wer", "cer"):
        if metric in report:
            assert report[metric]["rate"] == 0.0, report
    for field in report.get("tags", {}).values():
        assert field["accuracy"] == 1.0, report
    if "timestamps" in report:
        assert report["timestamps"]["mean_abs_boundary_s"] == 0.0, report
    # one window: the model's own text, unchanged
    assert join_windows(windows[:1], task)["text"] == windows[0][1]


def test_scoring_numbers_by_hand():
    assert scoring.tokenize_for_wer("The cat, sat. <MALE> 你好，世界") == ["THE", "CAT", "SAT", "你", "好", "世", "界"]
    # punctuation inside a word stays (as compute-wer.py keeps ASCII runs), at its ends it goes
    assert scoring.tokenize_for_wer("Don\u2019t say 3.5, the U.S.A. is well-known (yes)") == [
        "DON'T", "SAY", "3.5", "THE", "U.S.A", "IS", "WELL-KNOWN", "YES"]
    assert scoring.wer(["don't stop"], ["don\u2019t stop"])["errors"] == 0  # curly = straight apostrophe
    refs = ["the cat sat on the mat", "你好世界"]
    hyps = ["the cat sit the mat please", "你好世"]
    w = scoring.wer(refs, hyps)
    # utt 1: sat->sit (S), on deleted (D), please inserted (I) = 3 errors / 6 words; utt 2: 界 deleted = 1 / 4
    assert (w["substitutions"], w["deletions"], w["insertions"], w["ref_tokens"]) == (1, 2, 1, 10)
    assert w["rate"] == pytest.approx(4 / 10)
    c = scoring.cer(["abc"], ["abd x"])  # a b c vs a b d x: 1 S + 1 I over 3 characters
    assert c["errors"] == 2 and c["rate"] == pytest.approx(2 / 3)
    assert scoring.wer([""], ["extra words"])["insertions"] == 2
    acc = scoring.tag_accuracy(["male", "female", "female", "male"], ["male", "male", "female", None])
    assert acc["accuracy"] == 0.5 and acc["labels"] == ["female", "male", "<--no_tag-->"]
    assert acc["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    ts = scoring.timestamp_error([[{"token": "a", "start": 0.0, "end": 0.5}, {"token": "b", "start": 0.5, "end": 1.0}]],
                                 [[{"token": "a", "start": 0.1, "end": 0.5}, {"token": "c", "start": 0.5, "end": 1.0}]])
    assert ts["matched_words"] == 1 and ts["mean_abs_start_s"] == pytest.approx(0.1)
    assert ts["mean_abs_end_s"] == pytest.approx(0.0) and ts["within_0.1s"] == 1.0


def test_osum_eval_alignment_listing_and_compute_wer_options(tmp_path, capsys):
    """compute-wer --v=1 style per-utterance listing (hand-checked alignment), and its ignore / cluster / case
    options: each changes the counted errors exactly as the files say."""
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("u1 THE CAT SAT ON THE MAT\nu2 OK GOOD\n")
    hyp.write_text("u1 the cat sat on a mat\nu2 okay Good\n")
    out = tmp_path / "r"
    assert evaluate.main(["--ref", str(ref), "--hyp", str(hyp), "--out", str(out), "--v", "1"]) == 0
    listing = (out / "alignment.txt").read_text()
    assert "utt: u1\nWER: 16.67 % N=6 C=5 S=1 D=0 I=0\nlab: THE CAT SAT ON THE MAT\nrec: THE CAT SAT ON A   MAT" in listing
    assert "utt: u2\nWER: 50.00 % N=2 C=1 S=1 D=0 I=0\nlab: OK   GOOD\nrec: OKAY GOOD" in listing
    assert listing in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["tasks"]["<TRANSCRIBE>"]["wer"]["errors"] == 2
    (tmp_path / "ig").write_text("the a\n")
    (tmp_path / "cl").write_text("ok okay\n")
    for extra, errors in ((["--ignore", str(tmp_path / "ig")], 1), (["--cluster", str(tmp_path / "cl")], 1),
                          (["--ignore", str(tmp_path / "ig"), "--cluster", str(tmp_path / "cl")], 0),
                          (["--case-sensitive"], 2 + 5 + 1)):  # case: every lower-case hyp word differs
        assert evaluate.main(["--ref", str(ref), "--hyp", str(hyp), "--out", str(out), *extra]) == 0
        assert json.loads((out / "report.json").read_text())["tasks"]["<TRANSCRIBE>"]["wer"]["errors"] == errors, extra


def test_osum_eval_cli_reports_per_task(tmp_path, capsys):
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps(d) + "\n" for d in [
        {"key": "u1", "txt": "THE CAT SAT <MALE>", "task": "<TRANSCRIBE> <GENDER>"},
        {"key": "u2", "txt": "A DOG <FEMALE>", "task": "<TRANSCRIBE> <GENDER>"},
        {"key": "u3", "txt": "HELLO WORLD", "task": "<TRANSCRIBE>"},
        {"key": "u4", "txt": "hi<0.0,0.4>there<0.4,0.9>", "task": "<TRANSCRIBE> <ALIGN>"},
        {"key": "u5", "txt": "NOT DECODED"},
    ]))
    hyp = tmp_path / "results.jsonl"
    hyp.write_text("".join(json.dumps(d) + "\n" for d in [
        {"key": "u1", "text": "the cat sat<male>", "task": "<TRANSCRIBE> <GENDER>"},
        {"key": "u2", "text": "a cat<male>", "task": "<TRANSCRIBE> <GENDER>"},
        {"key": "u3", "text": "hello word", "task": "<TRANSCRIBE>"},
        {"key": "u4", "text": "hi<0.1,0.4>there<0.4,1.1>", "task": "<TRANSCRIBE> <ALIGN>"},
        {"key": "u6", "wav": "x.wav", "error": "cannot decode audio"},
    ]))
    out = tmp_path / "report"
    assert evaluate.main(["--ref", str(ref), "--hyp", str(hyp), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert sorted(rep["tasks"]) == ["<TRANSCRIBE>", "<TRANSCRIBE> <ALIGN>", "<TRANSCRIBE> <GENDER>"]
    g = rep["tasks"]["<TRANSCRIBE> <GENDER>"]
    assert g["wer"]["rate"] == pytest.approx(1 / 5) and g["tags"]["gender"]["accuracy"] == 0.5
    assert g["tags"]["gender"]["confusion"] == [[0, 1], [0, 1]]
    assert rep["tasks"]["<TRANSCRIBE>"]["wer"]["rate"] == 0.5
    assert rep["tasks"]["<TRANSCRIBE>"]["cer"]["rate"] == pytest.approx(1 / 10)  # "world" -> "word"
    t = rep["tasks"]["<TRANSCRIBE> <ALIGN>"]["timestamps"]
    assert t["matched_words"] == 2 and t["mean_abs_start_s"] == pytest.approx(0.05)
    assert t["mean_abs_end_s"] == pytest.approx(0.1)
    assert rep["missing_hyp"] == ["u5"] and rep["missing_ref"] == []
    png = out / "transcribe_gender.gender.confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| male | 0 | 1 |" in (out / "transcribe_gender.md").read_text()
    assert "WER: 20.00 %" in capsys.readouterr().out
    # OSUM's key<TAB>text files, one task for all
    (tmp_path / "ref.txt").write_text("u1\tTHE CAT <MALE>\nu2\tA DOG <FEMALE>\n")
    (tmp_path / "hyp.txt").write_text("u1\tthe cat<female>\nu2\ta dog<female>\n")
    assert evaluate.main(["--ref", str(tmp_path / "ref.txt"), "--hyp", str(tmp_path / "hyp.txt"),
                          "--task", "<TRANSCRIBE><GENDER>"]) == 0
    assert "accuracy 50.00 %" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "u1", "text": "x"}\n{"nokey": 1}\n')
    assert evaluate.main(["--ref", str(ref), "--hyp", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


# -- the lean greedy loop (engine="auto"/"fast") against transformers' generate ------------------------------------


def _random_osum(eos: int = 299):
    """A tiny randomly initialised model (no package, no JAX): enough to compare two decoding loops."""
    import torch

    from osum_torch_infer.modeling import AdapterConfig, EncoderConfig, OSUMConfig, OSUMForConditionalGeneration

    llm = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
               tie_word_embeddings=False, rms_norm_eps=1e-6)
    cfg = OSUMConfig(encoder=EncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64),
                     adapter=AdapterConfig(num_layers=1, num_heads=2, ffn_dim=64, max_positions=256),
                     llm=llm, speech_token_num=10, eos_token_id=eos, torch_dtype="float32")
    torch.manual_seed(0)
    model = OSUMForConditionalGeneration(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # a peaky output distribution, so that greedy decoding has no near-ties
        model.llm.lm_head.weight.mul_(50.0)
    return model


def _inputs(seed=0, lengths=(173, 64, 120)):
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths)
    feats = rng.standard_normal((len(lengths), int(lengths.max()), 80)).astype(np.float32)
    prompts = [list(rng.integers(0, 280, n)) for n in (5, 2, 7)[:len(lengths)]]
    return feats, lengths, prompts


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("min_new", [0, 12])
def test_fast_greedy_equals_transformers_generate(cache, min_new):
    model = _random_osum()
    feats, lengths, prompts = _inputs()
    kw = dict(max_new_tokens=12, min_new_tokens=min_new, cache_implementation=cache)
    ref = model.generate(feats, lengths, prompts, engine="hf", **kw)
    assert model.generate(feats, lengths, prompts, engine="fast", **kw) == ref
    assert model.generate(feats, lengths, prompts, **kw) == ref  # auto -> fast loop for greedy
    # batch 1 (no padding: no attention mask at all, as generate does)
    for i in range(len(lengths)):
        one = model.generate(feats[i:i + 1, :lengths[i]], lengths[i:i + 1], prompts[i:i + 1], engine="fast", **kw)
        assert one == model.generate(feats[i:i + 1, :lengths[i]], lengths[i:i + 1], prompts[i:i + 1], engine="hf",
                                     **kw) == [ref[i]]


@pytest.mark.parametrize("cache", [None, "static"])
def test_fast_greedy_stops_like_generate(cache):
    """Rows ending at different steps (EOS), min_new_tokens holding EOS back, and a list of EOS ids."""
    feats, lengths, prompts = _inputs(1)
    probe = _random_osum().generate(feats, lengths, prompts, engine="hf", max_new_tokens=10)
    eos = probe[1][3]  # a token row 1 produces at step 3: make it the end-of-text id
    model = _random_osum(eos=eos)
    for kw in (dict(max_new_tokens=10), dict(max_new_tokens=10, min_new_tokens=5),
               dict(max_new_tokens=10, eos_token_id=[eos, probe[0][2]])):
        ref = model.generate(feats, lengths, prompts, engine="hf", cache_implementation=cache, **kw)
        assert model.generate(feats, lengths, prompts, engine="fast", cache_implementation=cache, **kw) == ref
        if "min_new_tokens" not in kw:
            assert min(len(r) for r in ref) < 10
    assert len(model.generate(feats, lengths, prompts, engine="fast", max_new_tokens=10)[1]) == 3


def test_engine_selection():
    from osum_torch_infer.modeling import fast_greedy_unsupported

    model = _random_osum()
    assert fast_greedy_unsupported(model.decoding_config("greedy", max_new_tokens=5)) == ""
    assert fast_greedy_unsupported(model.decoding_config("greedy", cache_implementation="static")) == ""
    assert "repetition_penalty" in fast_greedy_unsupported(model.decoding_config("greedy", repetition_penalty=1.1))
    assert fast_greedy_unsupported(model.decoding_config("beam"))
    assert fast_greedy_unsupported(model.decoding_config("osum"))
    # a static cache where transformers' generate would torch.compile the decode step: auto leaves it to generate
    from transformers.generation.configuration_utils import CompileConfig

    from osum_torch_infer.modeling import hf_compiles_decode

    static = model.decoding_config("greedy", cache_implementation="static")
    assert hf_compiles_decode(static, torch.device("cpu")) == ""
    assert "compiles" in hf_compiles_decode(static, torch.device("cuda"))
    assert hf_compiles_decode(model.decoding_config("greedy", max_new_tokens=5), torch.device("cuda")) == ""
    assert hf_compiles_decode(model.decoding_config("greedy", cache_implementation="static", disable_compile=True),
                              torch.device("cuda")) == ""
    every = CompileConfig()
    every._compile_all_devices = True
    assert "compiles" in hf_compiles_decode(
        model.decoding_config("greedy", cache_implementation="static", compile_config=every), torch.device("cpu"))
    feats, lengths, prompts = _inputs(2)
    calls = []
    import osum_torch_infer.modeling as modeling

    orig = modeling.greedy_decode
    modeling.greedy_decode = lambda *a, **k: calls.append(1) or orig(*a, **k)
    model.generate(feats, lengths, prompts, max_new_tokens=3)
    model.generate(feats, lengths, prompts, decoding="beam", max_new_tokens=3)  # falls back to generate
    model.generate(feats, lengths, prompts, max_new_tokens=3, engine="hf")
    modeling.greedy_decode = orig
    assert len(calls) == 1
    with pytest.raises(ValueError, match="plain greedy"):
        model.generate(feats, lengths, prompts, decoding="beam", max_new_tokens=3, engine="fast")
    with pytest.raises(ValueError, match="unknown engine"):
        model.generate(feats, lengths, prompts, engine="turbo")


def test_results_files_are_one_line_per_result_and_atomic(tmp_path):
    from osum_torch_infer.pipeline import write_results

    rows = [{"key": "a", "text": "two\nlines\tand a tab\r\u2028"}, {"key": "b", "text": "fine"},
            {"key": "c", "wav": "c.wav", "error": "cannot read"}]
    out = tmp_path / "hyp.txt"
    assert write_results(iter(rows), out, "text") == (2, 1)
    assert out.read_text(encoding="utf-8").splitlines() == ["a\ttwo lines and a tab  ", "b\tfine"]
    texts, _ = evaluate.read_any(out)  # what osum-eval reads back: both results, nothing split off
    assert sorted(texts) == ["a", "b"]

    def broken():
        yield rows[1]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_results(broken(), tmp_path / "half.jsonl")
    assert list(tmp_path.iterdir()) == [out]  # neither the result nor a temporary is left
