"""``osum-decode`` (JAX, on the CPU mesh) against the torch runtime on the same tiny model exported as a package:
greedy tokens equal the runtime's greedy tokens, beam search equals transformers' beam search (the package's
``beam`` preset: 4 beams, length penalty 1.0), 8 sharded devices equal 1 device, the result lines equal
``osum-infer``'s, and an interrupted run resumes to the same bytes."""

import json

import jax
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

import osum_jax.checkpoint as ck
from osum_jax.checkpoint import flat_variables
from osum_jax.config_loading import load_config
from osum_jax.convert.torch_package import export_torch_package
from osum_jax.decode import cli
from osum_jax.decode.program import DecodeProgram, Decoding
from osum_jax.models import OSUM
from osum_jax.train.mesh import build_mesh
from osum_torch_infer import cli as infer_cli
from osum_torch_infer.modeling import OSUMForConditionalGeneration
from tests.corpus import train_tokenizer
from tests.helpers import TINY

N_NEW = 10
pytestmark = pytest.mark.slow  # each test compiles several decode programs (minutes on 2 cores)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("decode")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog", "please call stella"] * 4, root / "tok",
                          vocab_size=300)
    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    cfg = load_config(TINY, [f"model.llm.vocab_size={vocab}", f"data.tokenizer={tok}"])
    model = OSUM(cfg.model, rngs=nnx.Rngs(7))
    rng = np.random.default_rng(7)
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "lora_b":  # non-zero LoRA B: the adapters matter
            var.set_value(0.2 * rng.standard_normal(var.shape).astype(np.float32))
    params = {k: np.asarray(v.get_value()) for k, v in flat_variables(model).items()}
    ckpt = root / "ckpt"
    ck.write_checkpoint(ckpt, {k: ck.StreamedArray.of(a) for k, a in params.items()}, cfg, {}, {})
    run = root / "run"  # an osum-train output directory's layout: RUN/checkpoints/STEP
    ck.write_checkpoint(run / "checkpoints", {k: ck.StreamedArray.of(a) for k, a in params.items()}, cfg, {}, {},
                        step=3)
    pkg = root / "pkg"
    export_torch_package(model, cfg.model, pkg, tokenizer_dir=tok, dtype="fp32", progress=False)
    # audio of different lengths (noise and tones: a random model writes garbage either way)
    entries = []
    for i, seconds in enumerate((1.3, 2.7, 0.6, 4.1, 1.9, 3.3)):
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (180 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(root / f"u{i}.wav", wave.astype(np.float32), 16000)
        entries.append({"key": f"u{i}", "wav": str(root / f"u{i}.wav"), "txt": "x",
                        "task": "<TRANSCRIBE>" if i % 3 else "<TRANSCRIBE><GENDER>"})
    data = root / "data.list"
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    tm = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
    return dict(root=root, cfg=cfg, model=model, ckpt=ckpt, run=run, pkg=pkg, data=data, tm=tm, eos=tm.eos_token_id)


def _inputs(seed=0, lengths=(173, 100, 41, 260, 77)):
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((n, 80)).astype(np.float32) for n in lengths]
    prompts = [rng.integers(0, 250, k).tolist() for k in (5, 3, 1, 0, 7)]
    return feats, prompts


def _torch(tm, feats, prompts, decoding, eos=None):
    t = max(f.shape[0] for f in feats)
    x = np.zeros((len(feats), t, 80), np.float32)
    for i, f in enumerate(feats):
        x[i, :f.shape[0]] = f
    lengths = np.array([f.shape[0] for f in feats])
    old = tm.eos_token_id
    tm.eos_token_id = old if eos is None else eos
    try:
        return tm.generate(x, lengths, prompts, decoding=decoding, max_new_tokens=N_NEW)
    finally:
        tm.eos_token_id = old


def _program(setup, decoding, devices, eos, **mesh):
    cfg = load_config(TINY, [f"model.llm.vocab_size={setup['cfg'].model.llm.vocab_size}"]
                      + [f"train.mesh.{k}={v}" for k, v in mesh.items()])
    program = DecodeProgram(cfg, build_mesh(cfg.train.mesh, devices), decoding, eos,
                            batch_per_device=4 // len(devices) or 1, frame_buckets=(128, 300))
    return program, program.place(setup["model"])


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_tokens_equal_the_torch_runtime_and_sharded_equals_one_device(setup, method):
    """Greedy: the runtime's greedy loop; beam: transformers' beam search (4 beams, length penalty 1.0). Twice: with
    the package's end-of-text id (never emitted by this random model in 10 tokens) and with a token that one row
    emits mid-way declared the end, so rows and beams end early."""
    assert len(jax.devices()) == 8
    feats, prompts = _inputs(1)
    decoding = Decoding(method, max_new_tokens=N_NEW, num_beams=4, length_penalty=1.0)
    want = _torch(setup["tm"], feats, prompts, method)
    assert all(len(r) == N_NEW for r in want)
    one, s1 = _program(setup, decoding, jax.devices()[:1], setup["eos"], data=1, fsdp=1)
    eight, s8 = _program(setup, decoding, jax.devices(), setup["eos"], data=4, fsdp=2)
    assert one.rows == 4 and eight.rows == 8  # five utterances: two batches on one device, one padded on eight
    got1 = one.decode(s1, feats[:4], prompts[:4]) + one.decode(s1, feats[4:], prompts[4:])
    got8 = eight.decode(s8, feats, prompts)
    assert got1 == want and got8 == want
    # the model is sharded as training shards it: the LLM's MLP kernel over fsdp
    k = s8[1]["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].get_value()
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    eos = want[1][3]
    want_eos = _torch(setup["tm"], feats, prompts, method, eos=eos)
    assert len(want_eos[1]) < N_NEW
    one, s1 = _program(setup, decoding, jax.devices()[:1], eos, data=1, fsdp=1)
    eight, s8 = _program(setup, decoding, jax.devices(), eos, data=4, fsdp=2)
    assert one.decode(s1, feats[:4], prompts[:4]) + one.decode(s1, feats[4:], prompts[4:]) == want_eos
    assert eight.decode(s8, feats, prompts) == want_eos
    if method == "beam":  # beam search found other outputs than greedy: the comparison is not greedy's again
        assert want != _torch(setup["tm"], feats, prompts, "greedy")


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_result_lines_equal_osum_infer(setup, tmp_path, method):
    ours, theirs = tmp_path / "decode.jsonl", tmp_path / "infer.jsonl"
    common = ["--data", str(setup["data"]), "--decoding", method, "--max-new-tokens", str(N_NEW), "--no-progress"]
    assert cli.main([str(setup["ckpt"]), *common, "--out", str(ours), "--batch-size", "1",
                     "train.mesh.data=4", "train.mesh.fsdp=2"]) == 0
    assert infer_cli.main(["--model", str(setup["pkg"]), *common, "--out", str(theirs), "--device", "cpu",
                           "--dtype", "fp32", "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in ours.read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"u{i}" for i in range(6)]
    assert all(r["text"] for r in rows)
    assert ours.read_bytes() == theirs.read_bytes()


def test_resume_and_shards(setup, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    args = [str(setup["ckpt"]), "--data", str(setup["data"]), "--max-new-tokens", str(N_NEW), "--no-progress"]
    assert cli.main(args + ["--out", str(full)]) == 0
    lines = full.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # killed while writing the third line
    assert cli.main(args + ["--out", str(part)]) == 2  # an existing --out needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert cli.main(args + ["--out", str(part), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "torn last line" in err and "2 of 6 utterance(s) done, 4 to go" in err
    assert part.read_bytes() == full.read_bytes()
    assert cli.main(args + ["--out", str(part), "--resume"]) == 0  # nothing left to do
    # two shards hold every line once, each shard's lines in list order; the second from the run directory
    shards = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    assert cli.main(args + ["--out", str(shards[0]), "--shard", "0/2"]) == 0
    assert cli.main([str(setup["run"])] + args[1:] + ["--out", str(shards[1]), "--shard", "1/2"]) == 0
    assert shards[0].read_bytes() == b"".join(lines[0::2]) and shards[1].read_bytes() == b"".join(lines[1::2])


@pytest.mark.multiprocess
def test_two_processes_decode_their_shares_and_merge_to_one_process_bytes(setup, tmp_path):
    """2 processes x 4 CPU devices over loopback (``jax.distributed``, as osum-train's two-process test): each
    decodes every other utterance in one global batch per step, writes its part, and process 0 merges them; the
    merged file equals one process on 8 devices byte for byte. 9 utterances, 4 rows per process and step: process
    0 has 5 (two steps), process 1 has 4 (one step, then a step of dummy rows only)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lines = setup["data"].read_text().splitlines()
    extra = [json.dumps({**json.loads(lines[i]), "key": f"v{i}"}) for i in (3, 0, 4)]
    data = tmp_path / "nine.list"
    data.write_text("\n".join(lines + extra) + "\n")
    args = [str(setup["ckpt"]), "--data", str(data), "--max-new-tokens", str(N_NEW), "--no-progress",
            "--batch-size", "1", "train.mesh.data=8", "train.mesh.fsdp=1"]
    one = tmp_path / "one.jsonl"
    assert cli.main(args + ["--out", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    port = 20000 + (os.getpid() + 7919) % 20000
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   OSUM_COORDINATOR=f"127.0.0.1:{port}", OSUM_NUM_PROCESSES="2", OSUM_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-m", "osum_jax.decode.cli", *args, "--out", str(two)],
                                      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "merged 2 part(s)" in outs[0] and "9 result(s)" in outs[0]
    keys = [json.loads(line)["key"] for line in two.read_text().splitlines()]
    assert keys == [f"u{i}" for i in range(6)] + ["v3", "v0", "v4"]
    assert two.read_bytes() == one.read_bytes()
    parts = [tmp_path / f"two.jsonl.part{k}-of-2" for k in range(2)]
    want = one.read_bytes().splitlines(keepends=True)
    assert [pt.read_bytes() for pt in parts] == [b"".join(want[0::2]), b"".join(want[1::2])]


def test_user_mistakes_are_one_line_and_exit_2(setup, tmp_path, capsys):
    out = str(tmp_path / "o.jsonl")
    cases = [
        ([str(tmp_path / "nope"), "--data", str(setup["data"]), "--out", out], "no such checkpoint directory"),
        ([str(setup["ckpt"]), "--data", str(tmp_path / "missing.list"), "--out", out], "cannot read the data list"),
        ([str(setup["ckpt"]), "--data", str(setup["data"]), "--out", out, "model.nope=1"], "config error"),
        ([str(setup["ckpt"]), "--data", str(setup["data"]), "--out", out, "--task", "<NOPE>"], "<NOPE>"),
        ([str(setup["ckpt"]), "--data", str(setup["data"]), "--out", out, "data.tokenizer="], "data.tokenizer"),
        ([str(setup["ckpt"]), "--data", str(setup["data"]), "--out", out, "--num-beams", "0"], "--num-beams"),
        ([str(setup["ckpt"]), "--data", str(setup["data"]), "--out", out, "--frame-buckets", "a,b"],
         "--frame-buckets"),
        ([str(setup["ckpt"]), "--out", out], "--data and --out are required"),
    ]
    for argv, what in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("osum-decode: ") and what in err[0], (argv, err)
    assert not (tmp_path / "o.jsonl").exists()


def test_plan_compiles_for_a_tpu_pod_and_counts_every_step(tpu_compiler, capsys):
    """``--plan --target``: the decode program compiled for v5p x 16 on this host (tiny config); the cost model's
    time grows with the new-token budget (the loop's trip count is counted, not its body once)."""
    reports = {}
    for n in (4, 16):
        assert cli.main(["configs/tiny.yaml", "--plan", "--target", "tpu:v5p:2x2x4", "--json", "--batch-size", "2",
                         "--max-new-tokens", str(n), "--plan-frames", "500", "train.mesh.data=16",
                         "train.mesh.fsdp=1"]) == 0
        reports[n] = json.loads(capsys.readouterr().out)
    r4, r16 = reports[4], reports[16]
    assert r16["devices"] == 16 and r16["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1}
    assert r16["batch"] == {"rows": 32, "per_device": 2, "frames": 500, "prompt": 64}
    assert r16["basis"].startswith("TPU cost model") and 0 < r16["memory_bytes"]["total"] < r16["hbm_bytes"]
    assert r16["batch_seconds"] > 2 * r4["batch_seconds"]
    assert r16["tokens_per_second"] == pytest.approx(32 * 16 / r16["batch_seconds"])
    assert cli.main(["configs/tiny.yaml", "--plan"]) == 2  # --plan needs --target
    assert "--plan needs --target" in capsys.readouterr().err
