"""import-osum / export-osum: OSUM's exact key layout, bit-exact round trip, logits vs a torch OSUM, strictness.

The torch side is a small module written from the reference (§1.1, §2, §4) whose ``state_dict`` has OSUM's
keys because its submodules carry OSUM's names (wenet encoder/adapter, peft-wrapped HF Qwen2, the aliases
``embed_tokens``/``lm_head``, the unused ``ln_speech``/``speaker_head``). Its forward is an independent torch
formulation (wenet attention written out; HF Qwen2 + peft for the LLM).
"""

import math
import re
import zipfile

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from osum_jax import checkpoint as ck
from osum_jax.convert import stream
from osum_jax.convert.cli import main
from osum_jax.convert.osum_pt import canonical_keys
from tests.helpers import TINY, rel_err, tiny_model_config

CFG = tiny_model_config()
E, A, L = CFG.encoder, CFG.adapter, CFG.llm


class MHA(nn.Module):  # wenet MultiHeadedAttention
    def __init__(self, d, heads, key_bias):
        super().__init__()
        self.h = heads
        self.linear_q, self.linear_k = nn.Linear(d, d), nn.Linear(d, d, bias=key_bias)
        self.linear_v, self.linear_out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.h, d // self.h).transpose(1, 2)
                   for m in (self.linear_q, self.linear_k, self.linear_v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h), dim=-1)
        return self.linear_out((att @ v).transpose(1, 2).reshape(b, t, d))


class FFN(nn.Module):
    def __init__(self, d, f, act):
        super().__init__()
        self.w_1, self.w_2, self.act = nn.Linear(d, f), nn.Linear(f, d), act

    def forward(self, x):
        return self.w_2(self.act(self.w_1(x)))


class Block(nn.Module):  # wenet TransformerEncoderLayer, normalize_before=True
    def __init__(self, d, heads, f, act, key_bias):
        super().__init__()
        self.self_attn, self.feed_forward = MHA(d, heads, key_bias), FFN(d, f, act)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class Holder(nn.Module):
    pass


def whisper_pe(n, d):  # OpenAI sinusoids
    inv = torch.exp(-math.log(10000) / (d // 2 - 1) * torch.arange(d // 2, dtype=torch.float64))
    t = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], 1).float()[None]


def espnet_pe(n, d):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe[None]


class TorchOSUM(nn.Module):
    def __init__(self):
        super().__init__()
        d = E.d_model
        self.encoder = Holder()
        self.encoder.embed = Holder()
        self.encoder.embed.conv = nn.Sequential(nn.Conv1d(80, d, 3, padding=1), nn.GELU(),
                                                nn.Conv1d(d, d, 3, stride=2, padding=1), nn.GELU())
        self.encoder.embed.pos_enc = Holder()
        self.encoder.embed.pos_enc.register_buffer("pe", whisper_pe(E.max_source_positions, d))
        self.encoder.encoders = nn.ModuleList([Block(d, E.num_heads, E.ffn_dim, nn.GELU(), False)
                                               for _ in range(E.num_layers)])
        self.encoder.after_norm = nn.LayerNorm(d)
        self.ln_speech = nn.LayerNorm(d)
        st = self.speech_transformer = Holder()
        st.embed = Holder()
        st.embed.out = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Dropout(0.0))
        st.embed.pos_enc = Holder()
        st.embed.pos_enc.register_buffer("pe", espnet_pe(A.max_positions, d))
        st.encoders = nn.ModuleList([Block(d, A.num_heads, A.ffn_dim, nn.ReLU(), True) for _ in range(A.num_layers)])
        st.after_norm = nn.LayerNorm(d)
        qcfg = Qwen2Config(vocab_size=L.vocab_size, hidden_size=L.hidden_size, intermediate_size=L.intermediate_size,
                           num_hidden_layers=L.num_layers, num_attention_heads=L.num_heads,
                           num_key_value_heads=L.num_kv_heads, head_dim=L.resolved_head_dim, rope_theta=L.rope_theta,
                           rms_norm_eps=L.rms_norm_eps, tie_word_embeddings=False, attn_implementation="eager")
        self.llama_model = get_peft_model(Qwen2ForCausalLM(qcfg), PeftLoraConfig(
            r=CFG.lora.rank, lora_alpha=CFG.lora.alpha, lora_dropout=0.0, target_modules=list(CFG.lora.targets),
            task_type="CAUSAL_LM"))
        self.down_sample_2 = Holder()
        self.down_sample_2.conv = nn.Sequential(*[m for s in (1, 2, 2) for m in (
            nn.ConstantPad1d((2, 0), 0.0), nn.Conv1d(d, d, 3, stride=s), nn.GELU())])
        self.speech_llama_proj = nn.Linear(d, L.hidden_size)
        self.embed_tokens = self.llama_model.get_input_embeddings()  # aliases, as OSUM registers them
        self.lm_head = self.llama_model.get_output_embeddings()
        self.speech_token_emded = nn.Embedding(CFG.speech_token_num + 2, L.hidden_size)
        self.speaker_head = nn.Linear(L.hidden_size, CFG.speech_token_num)

    def speech(self, feats):  # [T, 80] -> [ceil(T/8), D_llm], batch size 1 (OSUM inference)
        x = self.encoder.embed.conv(feats.T[None]).transpose(1, 2)
        x = x + self.encoder.embed.pos_enc.pe[:, : x.shape[1]]
        for blk in self.encoder.encoders:
            x = blk(x)
        x = self.encoder.after_norm(x)
        x = self.down_sample_2.conv(x.transpose(1, 2)).transpose(1, 2)
        st = self.speech_transformer
        x = st.embed.out(x) * math.sqrt(x.shape[-1]) + st.embed.pos_enc.pe[:, : x.shape[1]]
        for blk in st.encoders:
            x = blk(x)
        return self.speech_llama_proj(st.after_norm(x))[0]

    def logits(self, feats, prompt, target):
        n = CFG.speech_token_num
        emb = self.embed_tokens
        seq = torch.cat([emb(prompt), self.speech_token_emded.weight[n:n + 1], self.speech(feats),
                         self.speech_token_emded.weight[n + 1:n + 2], emb(target)])
        out = self.llama_model(inputs_embeds=seq[None]).logits[0]
        first = seq.shape[0] - len(target) - 1  # the eos position predicts target[0]
        return out[first:first + len(target)]


def build_torch_osum(seed=0) -> TorchOSUM:
    torch.manual_seed(seed)
    m = TorchOSUM().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, which would hide LoRA mapping errors
                p.copy_(0.3 * torch.randn_like(p))
            elif "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def osum_state(m: TorchOSUM) -> dict:
    """OSUM's released dtype (bf16) for parameters; the pe buffers kept float32 to check mixed dtypes."""
    return {k: (v.to(torch.bfloat16) if not k.endswith("pos_enc.pe") else v.clone())
            for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("osum")
    tm = build_torch_osum()
    state = osum_state(tm)
    # the aliases must share storage like in OSUM's file
    state["embed_tokens.weight"] = state["llama_model.base_model.model.model.embed_tokens.weight"]
    state["lm_head.weight"] = state["llama_model.base_model.model.lm_head.weight"]
    pt = d / "infer.pt"
    torch.save(state, pt)
    ckpt = d / "ckpt"
    assert main(["import-osum", "--allow-default-prompts", str(pt), "--config", TINY, "--out", str(ckpt), "--no-progress"]) == 0
    return d, tm, pt, ckpt


def test_key_layout_is_osums(files):
    _, tm, pt, _ = files
    keys = list(torch.load(pt, weights_only=True, mmap=True))
    assert keys == canonical_keys(CFG)  # our canonical order == a module registered in OSUM's order
    assert "llama_model.base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias" in keys
    assert "llama_model.base_model.model.model.layers.1.mlp.up_proj.weight" in keys  # no LoRA on up_proj
    assert "llama_model.base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight" in keys
    assert {"embed_tokens.weight", "lm_head.weight", "ln_speech.bias", "speaker_head.weight"} <= set(keys)
    assert not any("inv_freq" in k for k in keys)


def _assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        ia = a[k].view(torch.int16) if a[k].dtype == torch.bfloat16 else a[k]
        ib = b[k].view(torch.int16) if b[k].dtype == torch.bfloat16 else b[k]
        assert torch.equal(ia, ib), k


def test_round_trip_is_bit_exact(files):
    d, _, pt, ckpt = files
    back = d / "back.pt"
    assert main(["export-osum", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    a, b = torch.load(pt, weights_only=True), torch.load(back, weights_only=True)
    _assert_same_state(a, b)
    assert b["embed_tokens.weight"].dtype == torch.bfloat16 and b["encoder.embed.pos_enc.pe"].dtype == torch.float32
    # the aliases are one storage again (the file does not store them twice)
    assert b["embed_tokens.weight"].data_ptr() == b["llama_model.base_model.model.model.embed_tokens.weight"].data_ptr()
    assert back.stat().st_size < pt.stat().st_size * 1.05


def _records(path) -> dict:
    """``data/N`` record -> (size, CRC-32), the archive's root folder left out."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC-32 matches its bytes
        return {i.filename.split("/", 1)[1]: (i.file_size, i.CRC) for i in z.infolist() if "/data/" in i.filename}


@pytest.mark.parametrize("block_bytes", [None, 4096])
def test_export_streams_the_archive_torch_save_writes(files, tmp_path, monkeypatch, block_bytes):
    """export-osum fills a ``skip_data`` skeleton in place: the result must be the archive ``torch.save`` writes
    for the same tensors (same records, sizes and CRC-32s), load with ``mmap=True`` and share the alias storage;
    a small ``BLOCK_BYTES`` sends the embedding / projection matrices through the banded path."""
    d, _, pt, ckpt = files
    if block_bytes:
        monkeypatch.setattr(stream, "BLOCK_BYTES", block_bytes)
    back = tmp_path / "stream.pt"
    assert main(["export-osum", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    assert not list(tmp_path.glob(".*"))  # no temporaries left
    a, b = torch.load(pt, weights_only=True), torch.load(back, weights_only=True, mmap=True)
    _assert_same_state(a, b)
    for alias, of in (("embed_tokens.weight", "llama_model.base_model.model.model.embed_tokens.weight"),
                      ("lm_head.weight", "llama_model.base_model.model.lm_head.weight")):
        assert b[alias].untyped_storage().data_ptr() == b[of].untyped_storage().data_ptr()
    ref = tmp_path / "ref.pt"
    torch.save(a, ref)
    assert _records(back) == _records(ref)
    # a cast export streams the cast bytes
    f32 = tmp_path / "f32.pt"
    assert main(["export-osum", str(ckpt), "--out", str(f32), "--dtype", "float32", "--no-progress"]) == 0
    c = torch.load(f32, weights_only=True, mmap=True)
    assert list(c) == list(a) and all(c[k].dtype == torch.float32 and torch.equal(c[k], a[k].float()) for k in a)
    _records(f32)


def test_checkpoint_layout_and_restore(files):
    _, _, _, ckpt = files
    root, step = ck.resolve(ckpt)
    assert step == 0 and sorted(p.name for p in (root / "0").iterdir() if p.is_dir()) == sorted(ck.CONVERTER_ITEMS)
    meta = ck.leaf_metadata(ckpt)
    assert str(meta["llm.layers.self_attn.q_proj.kernel"].dtype) == "bfloat16"  # stored as in the source
    assert str(meta["encoder.embed_positions"].dtype) == "float32"
    params = ck.restore_params(ckpt)
    assert params["llm.layers.self_attn.q_proj.kernel"].dtype == np.float32  # cast to param_dtype on restore
    assert params["llm.layers.self_attn.q_proj.lora_b"].shape == (L.num_layers, CFG.lora.rank, L.num_heads * 16)
    assert np.abs(np.asarray(params["llm.layers.mlp.down_proj.lora_b"])).max() > 0
    extras = ck.restore_extras(ckpt, 0)
    assert sorted(extras) == ["ln_speech.bias", "ln_speech.weight", "speaker_head.bias", "speaker_head.weight"]
    assert ck.read_config(ckpt).model == CFG


def _batch():
    rng = np.random.default_rng(0)
    fl, pl, tl = np.array([61, 40]), np.array([3, 2]), np.array([5, 3])
    return dict(feats=rng.standard_normal((2, 61, 80)).astype(np.float32), feats_lengths=fl,
                prompt=np.where(np.arange(3) < pl[:, None], rng.integers(0, L.vocab_size, (2, 3)), -1),
                prompt_lengths=pl,
                target=np.where(np.arange(5) < tl[:, None], rng.integers(0, L.vocab_size, (2, 5)), -100),
                target_lengths=tl)


def test_imported_logits_match_torch_osum(files):
    _, _, pt, ckpt = files
    model, cfg = ck.load_model(ckpt)
    ref = TorchOSUM().eval()  # float32 copy of exactly the stored (bf16) values
    ref.load_state_dict(torch.load(pt, weights_only=True), strict=True)
    ref.float()
    batch = _batch()
    out = model(batch)
    with torch.no_grad():
        for b in range(2):
            p, t, n = batch["prompt_lengths"][b], batch["target_lengths"][b], batch["feats_lengths"][b]
            want = ref.logits(torch.from_numpy(batch["feats"][b, :n]), torch.from_numpy(batch["prompt"][b, :p]),
                              torch.from_numpy(batch["target"][b, :t])).numpy()
            assert rel_err(out["logits"][b, :t], want) <= 1e-4
    # LoRA matters: the same weights without adapters give other logits
    with torch.no_grad(), ref.llama_model.disable_adapter():
        base = ref.logits(torch.from_numpy(batch["feats"][0, :61]), torch.from_numpy(batch["prompt"][0, :3]),
                          torch.from_numpy(batch["target"][0, :5])).numpy()
    assert rel_err(out["logits"][0, :5], base) > 1e-2


def test_plain_peft_names_import_and_round_trip(files):
    d, _, pt, ckpt = files
    state = torch.load(pt, weights_only=True)
    plain = {k.replace(".base_layer.", ".").replace(".lora_A.default.", ".lora_A.").replace(
        ".lora_B.default.", ".lora_B."): v for k, v in state.items()}
    plain["embed_tokens.weight"] = plain["llama_model.base_model.model.model.embed_tokens.weight"]
    plain["lm_head.weight"] = plain["llama_model.base_model.model.lm_head.weight"]
    p2, c2, back = d / "plain.pt", d / "plain_ckpt", d / "plain_back.pt"
    torch.save(plain, p2)
    assert main(["import-osum", "--allow-default-prompts", str(p2), "--config", TINY, "--out", str(c2), "--no-progress"]) == 0
    a, b = ck.restore_params(ckpt, dtype="bfloat16"), ck.restore_params(c2, dtype="bfloat16")
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert main(["export-osum", str(c2), "--out", str(back), "--no-progress"]) == 0
    _assert_same_state(torch.load(p2, weights_only=True), torch.load(back, weights_only=True))


def _variant(files, name, edit):
    d, _, pt, _ = files
    state = torch.load(pt, weights_only=True)
    edit(state)
    path = d / f"{name}.pt"
    torch.save(state, path)
    return path


def _fails(capsys, argv, *patterns):
    assert main(argv + ["--no-progress"] if argv[0] != "inspect" else argv) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert re.search(p, err), (p, err)
    return err


def test_missing_extra_and_wrong_shape_keys_abort(files, capsys, tmp_path):
    key = "llama_model.base_model.model.model.layers.1.mlp.gate_proj.lora_A.default.weight"
    missing = _variant(files, "missing", lambda s: s.pop(key))
    extra = _variant(files, "extra", lambda s: s.update({"speech_transformer.embed.out.2.weight": torch.ones(3)}))
    shape = _variant(files, "shape", lambda s: s.update({"speech_llama_proj.bias": torch.zeros(65)}))
    for path, pats in ((missing, [r"1 missing key", re.escape(key)]),
                       (extra, [r"1 unexpected key", r"speech_transformer\.embed\.out\.2\.weight \[3\]"]),
                       (shape, [r"speech_llama_proj\.bias: shape \[65\].*needs \[64\]"])):
        out = tmp_path / path.stem
        _fails(capsys, ["import-osum", "--allow-default-prompts", str(path), "--config", TINY, "--out", str(out)], re.escape(str(path)), *pats)
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    # a config whose dims disagree with the tensors is named too
    _fails(capsys, ["import-osum", "--allow-default-prompts", str(files[2]), "--config", TINY, "model.llm.intermediate_size=128",
                    "--out", str(tmp_path / "dims")], r"mlp\.up_proj\.weight: shape \[160, 64\].*needs \[128, 64\]")


def test_file_without_the_unused_extras_imports_and_round_trips(files, tmp_path):
    """``ln_speech.*`` / ``speaker_head.*`` are on the ignore list: a file without them is still a valid OSUM file
    (orbax refuses an empty item, so the checkpoint then has no ``extras`` item at all)."""
    def drop(state):
        for k in [k for k in state if k.startswith(("ln_speech.", "speaker_head."))]:
            del state[k]
        state["embed_tokens.weight"] = state["llama_model.base_model.model.model.embed_tokens.weight"]
        state["lm_head.weight"] = state["llama_model.base_model.model.lm_head.weight"]

    pt = _variant(files, "no_extras", drop)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back.pt"
    assert main(["import-osum", "--allow-default-prompts", str(pt), "--config", TINY, "--out", str(ckpt), "--no-progress"]) == 0
    assert not (ckpt / "0" / "extras").exists() and ck.restore_extras(ckpt, 0) == {}
    assert main(["export-osum", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    _assert_same_state(torch.load(pt, weights_only=True), torch.load(back, weights_only=True))


def test_alias_that_differs_is_an_error(files, capsys, tmp_path):
    def edit(s):
        s["lm_head.weight"] = s["lm_head.weight"].clone()
        s["lm_head.weight"][3, 4] += 1
    path = _variant(files, "alias", edit)
    _fails(capsys, ["import-osum", "--allow-default-prompts", str(path), "--config", TINY, "--out", str(tmp_path / "x")],
           r"lm_head\.weight differs from llama_model\.base_model\.model\.lm_head\.weight")


def test_truncated_file_and_existing_output(files, capsys, tmp_path):
    d, _, pt, ckpt = files
    data = pt.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        _fails(capsys, ["import-osum", "--allow-default-prompts", str(bad), "--config", TINY, "--out", str(tmp_path / "o")],
               re.escape(str(bad)), r"truncated|corrupt|cannot read")
    _fails(capsys, ["import-osum", "--allow-default-prompts", str(pt), "--config", TINY, "--out", str(ckpt)], r"already exists.*--force")
    target = tmp_path / "exists.pt"
    target.write_bytes(b"keep me")
    _fails(capsys, ["export-osum", str(ckpt), "--out", str(target)], r"already exists")
    assert target.read_bytes() == b"keep me"
    assert main(["export-osum", str(ckpt), "--out", str(target), "--force", "--no-progress"]) == 0
    assert len(torch.load(target, weights_only=True)) == len(torch.load(pt, weights_only=True, mmap=True))


def test_inspect_reports_modules(files, capsys):
    _, _, pt, ckpt = files
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "llm.layers" in text and "(LoRA)" in text and "bfloat16" in text and "extras" in text
    assert main(["inspect", str(pt)]) == 0
    text = capsys.readouterr().out
    assert "speech_transformer" in text and "shared-storage aliases: ['embed_tokens.weight', 'lm_head.weight']" in text


def _save_run(cfg_overrides, out, edit=None):
    """An osum-train run directory (one device) holding the trainer's model at step 3, after ``edit(model)``."""
    import jax

    from osum_jax.config_loading import load_config
    from osum_jax.train.trainer import Trainer

    cfg = load_config(TINY, ["train.output_dir=/tmp/unused", "train.progress=false", "train.mesh.fsdp=1",
                             "train.async_checkpoint=false"] + cfg_overrides)
    tr = Trainer(cfg, devices=jax.devices()[:1])
    if edit is not None:
        edit(tr.model)
    tr.step, tr.out_dir = 3, out
    tr.open_checkpoints()
    tr.save()
    tr.checkpointer.close()
    return tr.model


def test_export_osum_from_a_training_run(files, tmp_path):
    """A model trained here runs in OSUM's code: export-osum of an osum-train run started (train.init_from) from an
    imported OSUM file writes that file's keys, order and dtypes; the torch OSUM loads it strictly and gives the
    run's logits; the tensors training did not touch are bit-identical to the original file."""
    import jax

    d, _, pt, ckpt = files

    def train(model):  # stand-in for optimizer updates: move a LoRA B and an encoder weight
        for i, var in enumerate((model.llm.layers.self_attn.v_proj.lora_b, model.encoder.layers.fc1.kernel)):
            v = var.get_value()
            var.set_value(v + 0.05 * jax.random.normal(jax.random.key(i), v.shape, v.dtype))

    run = tmp_path / "run"
    _save_run([f"train.init_from={ckpt}"], run, train)
    out32, out = tmp_path / "run32.pt", tmp_path / "run.pt"
    assert main(["export-osum", str(run), "--out", str(out32), "--dtype", "float32", "--no-progress"]) == 0
    assert main(["export-osum", str(run), "--out", str(out), "--no-progress"]) == 0
    a, b = torch.load(pt, weights_only=True), torch.load(out, weights_only=True)
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    changed = {k for k in a if not torch.equal(a[k].view(torch.int16) if a[k].dtype == torch.bfloat16 else a[k],
                                               b[k].view(torch.int16) if b[k].dtype == torch.bfloat16 else b[k])}
    assert changed == {f"llama_model.base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.default.weight"
                       for i in range(L.num_layers)} | {f"encoder.encoders.{i}.feed_forward.w_1.weight"
                                                        for i in range(E.num_layers)}
    # the float32 export carries the trained values exactly; OSUM's module loads it and computes the run's logits
    model, _ = ck.load_model(run)  # a run is a model checkpoint: the one reader takes it
    assert ck.resolve(run)[1] == 3
    ref = TorchOSUM().eval()
    ref.load_state_dict(torch.load(out32, weights_only=True), strict=True)
    batch = _batch()
    got = model(batch)["logits"]
    with torch.no_grad():
        for i in range(2):
            p, t, n = batch["prompt_lengths"][i], batch["target_lengths"][i], batch["feats_lengths"][i]
            want = ref.logits(torch.from_numpy(batch["feats"][i, :n]), torch.from_numpy(batch["prompt"][i, :p]),
                              torch.from_numpy(batch["target"][i, :t])).numpy()
            assert rel_err(got[i, :t], want) <= 1e-4
    # --layout-from names the converter checkpoint explicitly (same result); a run has no layout of its own
    out2 = tmp_path / "run2.pt"
    assert main(["export-osum", str(run), "--out", str(out2), "--layout-from", str(ckpt), "--no-progress"]) == 0
    _assert_same_state(torch.load(out2, weights_only=True), b)
    bad = tmp_path / "bad.pt"
    assert main(["export-osum", str(run), "--out", str(bad), "--layout-from", str(run), "--no-progress"]) == 2
    assert not bad.exists()


def test_export_osum_from_a_run_trained_from_scratch(tmp_path, capsys):
    """A run without an OSUM origin exports in OSUM's canonical key order (as import-hf records it) and
    import-osum reads the file back to the run's exact parameters."""
    from osum_jax.checkpoint import flat_variables

    model = _save_run([], tmp_path / "run")
    out = tmp_path / "scratch.pt"
    assert main(["export-osum", str(tmp_path / "run"), "--out", str(out), "--no-progress"]) == 0
    assert "canonical key order" in capsys.readouterr().err
    state = torch.load(out, weights_only=True)
    assert list(state) == canonical_keys(CFG)
    assert state["embed_tokens.weight"].data_ptr() == \
        state["llama_model.base_model.model.model.embed_tokens.weight"].data_ptr()
    back = tmp_path / "back"
    assert main(["import-osum", "--allow-default-prompts", str(out), "--config", TINY, "--out", str(back), "--no-progress"]) == 0
    restored = ck.restore_params(back)
    want = {k: np.asarray(v.get_value()) for k, v in flat_variables(model).items()}
    assert sorted(restored) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(restored[k]), v, err_msg=k)
