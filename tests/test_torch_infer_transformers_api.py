"""The runtime as transformers expects it (Qwen2-Audio's shape): ``OSUMProcessor`` (feature extractor + tokenizer
+ prompt book), ``AutoProcessor`` / ``AutoModel`` after ``import osum_torch_infer``, and
``model.generate(**processor(audio, task=...))`` returning transformers' ``generate`` output, with the same tokens
as the runtime's token-list call (``generate_tokens``, the API before; checked against transformers and the JAX
model in test_torch_infer_parity / test_torch_infer_runtime)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_torch_infer_runtime import _inputs, _random_osum


def _hf_inputs(feats, lengths, prompts, pad):
    """The legacy inputs in transformers' layout: features [B, n_mels, T] + mask, prompt ids left-padded + mask."""
    b, t = feats.shape[:2]
    fmask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    p = max(len(x) for x in prompts)
    ids, amask = np.full((b, p), pad, np.int64), np.zeros((b, p), np.int64)
    for i, x in enumerate(prompts):
        if len(x):
            ids[i, p - len(x):], amask[i, p - len(x):] = x, 1
    return dict(input_features=torch.from_numpy(feats).transpose(1, 2), feature_attention_mask=torch.from_numpy(fmask),
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(amask))


def _strip(out: torch.Tensor, eos: int) -> list[list[int]]:
    return [next((r[:i] for i, t in enumerate(r) if t == eos), r) for r in out.tolist()]


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_generate_signature_gives_the_token_list_calls_tokens(decoding):
    from transformers.generation.utils import GenerateOutput

    model = _random_osum()
    feats, lengths, prompts = _inputs()
    kw = dict(decoding=decoding, max_new_tokens=12)
    want = model.generate_tokens(feats, lengths, prompts, **kw)
    assert model.generate(feats, lengths, prompts, **kw) == want  # the earlier call still works
    inputs = _hf_inputs(feats, lengths, prompts, pad=model.eos_token_id)
    out = model.generate(**inputs, **kw)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long and out.shape[0] == len(lengths)
    assert _strip(out, model.eos_token_id) == want
    # transformers' generate itself (engine="hf") returns the same tensor, shape included
    assert torch.equal(model.generate(**inputs, engine="hf", **kw), out)
    full = model.generate(**inputs, return_dict_in_generate=True, output_scores=True, **kw)
    assert isinstance(full, GenerateOutput) and torch.equal(full.sequences, out) and len(full.scores) == out.shape[1]


def test_generate_signature_without_prompt_and_masks():
    model = _random_osum()
    feats, lengths, _ = _inputs(3, lengths=(90, 90))
    want = model.generate_tokens(feats, lengths, [[], []], max_new_tokens=8)
    out = model.generate(input_features=torch.from_numpy(feats).transpose(1, 2), max_new_tokens=8)
    assert _strip(out, model.eos_token_id) == want


# -- a package (built from the tiny JAX model by the e2e fixture) --------------------------------------------------

from tests.test_torch_infer_e2e import package  # noqa: E402,F401 - the tiny package fixture (module scope)


def test_auto_classes_load_a_package_after_importing_osum_torch_infer(package):  # noqa: F811
    code = ("import sys, osum_torch_infer\n"
            "assert 'torch' not in sys.modules\n"
            "from transformers import AutoConfig, AutoModel, AutoProcessor\n"
            f"p = AutoProcessor.from_pretrained({str(package)!r})\n"
            f"m = AutoModel.from_pretrained({str(package)!r})\n"
            f"c = AutoConfig.from_pretrained({str(package)!r})\n"
            "print(type(p).__name__, type(p.feature_extractor).__name__, type(m).__name__, type(c).__name__,\n"
            "      m.dtype, m.device.type)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
                              "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OSUMProcessor", "OSUMFeatureExtractor", "OSUMForConditionalGeneration",
                                  "OSUMConfig", "torch.float32", "cpu"]


def test_processor_then_generate_equals_the_runtime(speech_corpus, package, tmp_path):  # noqa: F811
    """``model.generate(**processor(audio, task=...))``: the features are the runtime's log-mel, the prompt is the
    prompt book's, and greedy and beam tokens equal the token-list call on the pipeline's own inputs."""
    from osum_torch_infer import OSUMForConditionalGeneration, OSUMProcessor
    from osum_torch_infer.features import load_audio, log_mel_spectrogram
    from osum_torch_infer.pipeline import _prepare, read_list

    model = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")
    processor = OSUMProcessor.from_pretrained(package)
    items = read_list(speech_corpus["list"])[:3]
    task = "<TRANSCRIBE><GENDER>"
    waves = [load_audio(it.wav) for it in items]
    inputs = processor(waves, task=task)
    assert set(inputs) == {"input_features", "feature_attention_mask", "input_ids", "attention_mask"}
    units = [_prepare(model, it, task, None, 30.0)[0] for it in items]
    for i, u in enumerate(units):
        n = u.feats.shape[0]
        assert int(inputs["feature_attention_mask"][i].sum()) == n
        np.testing.assert_array_equal(inputs["input_features"][i, :, :n].numpy(), u.feats.T)
        np.testing.assert_array_equal(u.feats, log_mel_spectrogram(waves[i], 80))
        assert inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist() == u.prompt_ids
    feats = np.zeros((len(units), max(u.feats.shape[0] for u in units), 80), np.float32)
    for j, u in enumerate(units):
        feats[j, :u.feats.shape[0]] = u.feats
    lengths, prompts = [u.feats.shape[0] for u in units], [u.prompt_ids for u in units]
    eos = model.config.eos_token_id
    for decoding in ("greedy", "beam"):
        want = model.generate_tokens(feats, lengths, prompts, decoding=decoding, max_new_tokens=10)
        out = model.generate(**inputs, decoding=decoding, max_new_tokens=10)
        assert isinstance(out, torch.Tensor) and _strip(out, eos) == want, decoding
        assert processor.batch_decode(out) == [model.decode_text(w) for w in want]

    # save_pretrained / from_pretrained: processor_config.json holds the front end and the prompt book
    saved = processor.save_pretrained(tmp_path / "proc")
    cfg = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert str(tmp_path / "proc" / "processor_config.json") in saved
    assert cfg["processor_class"] == "OSUMProcessor" and cfg["feature_extractor"]["feature_size"] == 80
    assert cfg["prompts"] == processor.prompts and cfg["pad_token_id"] == eos
    again = OSUMProcessor.from_pretrained(tmp_path / "proc")
    round_trip = again(waves, task=task)
    for k in inputs:
        assert torch.equal(round_trip[k], inputs[k]), k
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(tmp_path / "proc")) is OSUMProcessor
    with pytest.raises(ValueError, match="not in the package's prompt file"):
        processor(waves[0], task="<NO_SUCH_TASK>")
    one = processor(waves[0], prompt="")  # an explicit (empty) prompt instead of a task
    assert one["input_ids"].shape == (1, 0)


def test_an_exported_package_carries_processor_config_json(package, tmp_path):  # noqa: F811
    """``osum-convert export-torch`` writes ``processor_config.json``: the front end's settings, the package's prompt
    book (as prompts.yaml holds it) and the end-of-text id as pad; the processor read from it equals the one
    built from config.json + prompts.yaml (an older package without the file)."""
    import shutil

    import yaml
    from tokenizers import Tokenizer

    from osum_torch_infer import OSUMProcessor

    cfg = json.loads((package / "processor_config.json").read_text(encoding="utf-8"))
    eod = Tokenizer.from_file(str(package / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert cfg["processor_class"] == "OSUMProcessor" and cfg["pad_token_id"] == eod
    assert cfg["feature_extractor"] == {"feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
                                        "padding_value": 0.0}
    book = yaml.safe_load((package / "prompts.yaml").read_text(encoding="utf-8"))
    assert sorted(p for ps in cfg["prompts"].values() for p in ps) == sorted(
        p for ps in book.values() for p in ([ps] if isinstance(ps, str) else ps))
    old = tmp_path / "old"
    shutil.copytree(package, old)
    (old / "processor_config.json").unlink()
    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    a, b = OSUMProcessor.from_pretrained(package), OSUMProcessor.from_pretrained(old)
    assert a.to_dict() == b.to_dict()
    x, y = a(wave, task="<TRANSCRIBE>"), b(wave, task="<TRANSCRIBE>")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_policy_lives_in_load_model_not_in_the_model_class(package):  # noqa: F811
    """``from_pretrained`` is transformers' (stored dtype, CPU, a torch dtype or "auto"); ``load_model`` holds the
    runtime's device/dtype choice; the earlier ``from_pretrained(device=, dtype="fp32")`` call reaches it."""
    from osum_torch_infer import OSUMForConditionalGeneration, load_model
    from osum_torch_infer.loading import AUDIO_PREFIXES

    plain = OSUMForConditionalGeneration.from_pretrained(package)
    assert plain.dtype == torch.float32 and plain.device.type == "cpu" and plain.device_reason == ""
    half = OSUMForConditionalGeneration.from_pretrained(package, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch.dtype"):
        OSUMForConditionalGeneration.load_package(package, dtype="fp16")
    ours = load_model(package, device="cpu", dtype="bf16")
    assert ours.dtype == torch.bfloat16 and ours.device_reason and ours.processor is not None
    legacy = OSUMForConditionalGeneration.from_pretrained(package, device="cpu", dtype="fp32")
    assert legacy.device_reason == load_model(package, device="cpu").device_reason
    for a, b in zip(plain.state_dict().items(), legacy.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    audio = load_model(package, device="cpu", parts="audio")
    assert all(v.device.type == "meta" for k, v in audio.state_dict().items() if not k.startswith(AUDIO_PREFIXES))
    assert all(v.device.type == "cpu" for k, v in audio.state_dict().items() if k.startswith(AUDIO_PREFIXES))


@pytest.mark.parametrize("order", ["osum_torch_infer first, AutoProcessor alone", "transformers first"])
def test_registration_in_either_import_order(order):
    first, second = ("import osum_torch_infer", "from transformers import AutoProcessor")
    if order == "transformers first":
        first, second = "from transformers import AutoModel, AutoProcessor", "import osum_torch_infer"
    code = (f"{first}\n{second}\n"
            "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING\n"
            "from transformers.models.auto.modeling_auto import MODEL_MAPPING\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "from osum_torch_infer.configuration_osum import OSUMConfig\n"
            "print(PROCESSOR_MAPPING[OSUMConfig].__name__, MODEL_MAPPING[OSUMConfig].__name__,\n"
            "      CONFIG_MAPPING['osum'].__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OSUMProcessor", "OSUMForConditionalGeneration", "OSUMConfig"]
