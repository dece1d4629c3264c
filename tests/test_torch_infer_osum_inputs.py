"""osum-infer at OSUM's level: tar shards (shard_full_data) as input, per-utterance prompts (``prompt``; OSUM's
``extra.question``), and every decoding flag checked against transformers' own ``generate`` with the same
settings (same tokens for greedy, beam, and sampling with a fixed seed on CPU)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from flax import nnx
from transformers import GenerationConfig

from osum_jax.convert.torch_package import export_torch_package
from osum_jax.models import OSUM
from osum_torch_infer import cli
from osum_torch_infer.features import load_audio, log_mel_spectrogram
from osum_torch_infer.modeling import OSUMForConditionalGeneration
from tests.corpus import train_tokenizer
from tests.helpers import tiny_model_config, write_tar

CFG = tiny_model_config()
QUESTION = "what is said here"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("osumin")
    tok = train_tokenizer(["transcribe the speech", QUESTION, "alpha bravo charlie"] * 4, root / "tok",
                          vocab_size=300)
    (root / "prompts.yaml").write_text('"<TRANSCRIBE>": ["transcribe the speech"]\n"<S2TCHAT>": ["alpha bravo"]\n')
    pkg = root / "pkg"
    model = OSUM(CFG, rngs=nnx.Rngs(3))
    export_torch_package(model, CFG, pkg, tokenizer_dir=tok, prompts_path=root / "prompts.yaml", dtype="fp32",
                         progress=False)
    rng = np.random.default_rng(0)
    entries, members = [], []
    for i, sec in enumerate((1.1, 0.8, 1.4)):
        wav = (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32)
        sf.write(root / f"u{i}.wav", wav, 16000, subtype="PCM_16")
        e = {"key": f"u{i}", "wav": str(root / f"u{i}.wav"), "txt": "x", "task": "<TRANSCRIBE>"}
        if i == 1:  # a chat utterance: its question is its prompt (OSUM's extra.question)
            e.update(task="<S2TCHAT>", extra={"question": QUESTION})
        entries.append(e)
        members.append((f"u{i}.wav", (root / f"u{i}.wav").read_bytes()))
        members.append((f"u{i}.txt", b"x"))
        members.append((f"u{i}.task", e["task"].encode()))
        if "extra" in e:
            members.append((f"u{i}.extra", json.dumps(e["extra"]).encode()))
    write_tar(root / "shard_000.tar", members)
    (root / "shards_list.txt").write_text("shard_000.tar\n")
    (root / "data.list").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root, pkg


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shards_and_lists_give_the_same_results_with_per_utterance_prompts(setup, tmp_path):
    root, pkg = setup
    base = ["--model", str(pkg), "--max-new-tokens", "5", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--data", str(root / "data.list"), "--out", str(tmp_path / "list.jsonl")]) == 0
    assert cli.main(base + ["--data", str(root / "shards_list.txt"), "--out", str(tmp_path / "shards.jsonl")]) == 0
    a, b = _rows(tmp_path / "list.jsonl"), _rows(tmp_path / "shards.jsonl")
    assert [r["key"] for r in a] == [r["key"] for r in b] == ["u0", "u1", "u2"]
    assert [(r["prompt"], r["text"]) for r in a] == [(r["prompt"], r["text"]) for r in b]
    assert a[1]["prompt"] == QUESTION and a[0]["prompt"] == "transcribe the speech"
    # the question really reached the model: the same audio with the task's own prompt decodes differently
    model = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
    feats = log_mel_spectrogram(load_audio(str(root / "u1.wav")), 80)
    own = model.generate(feats[None], np.array([len(feats)]), [model.encode_text(QUESTION)], max_new_tokens=5)[0]
    assert model.decode_text(own) == a[1]["text"]


@pytest.mark.parametrize("flags, gen", [
    ([], dict(do_sample=False, num_beams=1)),
    (["--decoding", "beam", "--num-beams", "3"], dict(do_sample=False, num_beams=3, length_penalty=1.0)),
    (["--do-sample", "--temperature", "0.7", "--top-k", "4", "--top-p", "0.9", "--repetition-penalty", "1.2",
      "--seed", "11"], dict(do_sample=True, num_beams=1, temperature=0.7, top_k=4, top_p=0.9,
                             repetition_penalty=1.2)),
])
def test_decoding_flags_equal_transformers_generate(setup, tmp_path, flags, gen):
    root, pkg = setup
    out = tmp_path / "r.jsonl"
    assert cli.main(["--model", str(pkg), "--wav", str(root / "u2.wav"), "--max-new-tokens", "6", "--device", "cpu",
                     "--no-progress", "--out", str(out), *flags]) == 0
    got = _rows(out)[0]["text"]
    model = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
    feats = log_mel_spectrogram(load_audio(str(root / "u2.wav")), 80)
    x, mask = model.build_prefix(torch.from_numpy(feats[None]), torch.tensor([len(feats)]),
                                 [model.encode_text("transcribe the speech")])
    eos = model.eos_token_id
    if "--seed" in flags:
        torch.manual_seed(11)
    with torch.no_grad():
        ids = model.llm.generate(inputs_embeds=x, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=6, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, **gen))[0].tolist()
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert got == model.decode_text(ids)
