"""osum-train end to end on real speech: it learns, resumes bit-identically after SIGKILL, runs on 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _overrides(corpus, out, **kw):
    base = {
        "data.train": str(corpus["list"]), "data.dev": str(corpus["list"]), "data.tokenizer": str(corpus["tokenizer"]),
        "data.frame_buckets": "[400,800]", "data.max_frames": 800, "data.target_buckets": "[16,32]",
        "data.max_label_tokens": 32, "data.max_prompt_tokens": 96, "data.max_frames_per_batch": 1600,
        "data.max_tokens_per_batch": 2000, "data.spec_aug": "false", "data.spec_sub": "false",
        "train.output_dir": str(out), "train.progress": "false", "train.grad_accum": 1, "train.log_every": 1,
        "train.mesh.fsdp": 1, "train.async_checkpoint": "false",
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _run(args, env_extra=None, **popen):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "osum_jax.train.cli", "configs/tiny.yaml", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(speech_corpus, tmp_path):
    common = {"train.steps": 8, "train.checkpoint_every": 2, "train.learning_rate": 1e-3,
              "train.warmup_steps": 2, "data.spec_aug": "true", "data.spec_sub": "true"}
    ref = _run(_overrides(speech_corpus, tmp_path / "ref", **common))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    expected = _losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9))
    # same run, killed with SIGKILL as soon as a checkpoint (not the last one) is complete
    run_dir = tmp_path / "killed"
    p = _run(_overrides(speech_corpus, run_dir, **common))
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        done = [d for d in ckpts.glob("*") if d.name.isdigit()] if ckpts.exists() else []
        if any(2 <= int(d.name) < 8 for d in done):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(_losses(run_dir))
    resumed = _run(_overrides(speech_corpus, run_dir, **common))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out
    got = _losses(run_dir)  # the log holds the steps before the kill and those after the restart
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == expected[step], (step, killed_at)  # bit-identical, data order included


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_saves_and_exits(speech_corpus, tmp_path):
    run_dir = tmp_path / "term"
    args = _overrides(speech_corpus, run_dir, **{"train.steps": 500, "train.checkpoint_every": 1000})
    p = _run(args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    steps = [int(d.name) for d in (run_dir / "checkpoints").glob("*") if d.name.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 500  # saved where it stopped, long before checkpoint_every


@pytest.mark.slow
def test_tiny_model_learns_real_speech_and_decodes_it(speech_corpus, tmp_path):
    """Train from scratch on the espeak corpus until greedy decoding reproduces the training transcripts."""
    from osum_jax.config_loading import load_config
    from osum_jax.train.trainer import Trainer

    cfg = load_config("configs/tiny.yaml", _overrides(
        speech_corpus, tmp_path / "learn", **{
            "train.steps": 150, "train.fire_module": "all", "train.learning_rate": 3e-3, "train.warmup_steps": 10,
            "train.schedule": "cosine", "train.checkpoint_every": 1000, "train.log_every": 10,
            "train.eval_every": 150, "train.eval_batches": 4, "train.eval_decode_batches": 4,
            "train.eval_max_new_tokens": 40, "train.weight_decay": 0.0, "data.seed": 1,
            "model.encoder.dropout": 0.0, "model.encoder.positional_dropout": 0.0,
            "model.adapter.dropout": 0.0, "model.adapter.positional_dropout": 0.0, "model.lora.dropout": 0.0}))
    import jax
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    summary = trainer.train()
    losses = _losses(tmp_path / "learn")
    assert losses[1] > 4.0 and summary["loss"] < 0.2 * losses[1], (losses[1], summary["loss"])
    # the dev list is the training list: greedy decoding must reproduce the transcripts almost exactly
    assert summary["eval/<TRANSCRIBE>/wer"] <= 0.1, trainer.last_eval_examples
    assert summary["compiled_shapes"] <= 4
    # the run's checkpoint exports to a torch package that computes the same loss (osum_torch_infer, fp32)
    import torch

    from osum_jax.convert.export_torch import export_torch
    from osum_torch_infer.modeling import OSUMForConditionalGeneration

    pkg = tmp_path / "pkg"
    export_torch(tmp_path / "learn", out=pkg, tokenizer=speech_corpus["tokenizer"], dtype="fp32", progress=False)
    tmodel = OSUMForConditionalGeneration.from_pretrained(pkg, device="cpu", dtype="fp32")
    host = next(iter(trainer.data_pipeline(train=False).dataset()))
    batch = {k: host[k] for k in ("feats", "feats_lengths", "prompt", "prompt_lengths", "target", "target_lengths")}
    jax_loss = float(trainer.model(batch)["loss"])
    with torch.no_grad():
        torch_loss = float(tmodel({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})["loss"])
    assert abs(jax_loss - torch_loss) <= 1e-4 * max(1.0, abs(jax_loss))


def test_plan_reports_full_osum_memory(capsys):
    from osum_jax.train.cli import main

    assert main(["configs/osum_full.yaml", "--plan", "--devices", "8", "--device-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "parameters 8,003,089,920 (trainable 387,473,408)" in out and "fits in 80 GiB" in out
    assert main(["configs/osum_full.yaml", "--plan", "--devices", "1", "--device-memory-gb", "16",
                 "train.fire_module=all"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["configs/osum_full.yaml", "--plan", "train.mesh.tensor=3", "--devices", "8"]) == 2


def _two_processes(corpus, out, port, **kw):
    procs = []
    for pid in range(2):
        env = {"OSUM_COORDINATOR": f"127.0.0.1:{port}", "OSUM_NUM_PROCESSES": "2", "OSUM_PROCESS_ID": str(pid)}
        procs.append(_run(_overrides(corpus, out, **{"train.mesh.data": 2, **kw}), env))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return outs


def _eval_rows(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


@pytest.mark.multiprocess
@pytest.mark.e2e
@pytest.mark.slow
def test_two_processes_train_together_and_resume_exactly(speech_corpus, tmp_path):
    """Two processes over loopback train together; each saves its own data-iterator position, so a restart from
    the step-2 checkpoint reproduces steps 3-4 bit-identically (each process reads its own shard). Evaluation
    during training covers both processes' dev shares: the same held-out loss and number of decoded utterances
    as one process evaluating the same checkpoint over the whole dev list."""
    import jax

    from osum_jax.config_loading import load_config
    from osum_jax.train.trainer import Trainer

    port = 20000 + os.getpid() % 20000
    run = tmp_path / "mp"
    common = {"train.steps": 4, "train.checkpoint_every": 2, "train.learning_rate": 1e-3, "train.warmup_steps": 2,
              "train.eval_every": 4, "train.eval_batches": 100, "train.eval_decode_batches": 100,
              "train.eval_max_new_tokens": 4}
    outs = _two_processes(speech_corpus, run, port, **common)
    expected = _losses(run)
    # every step ran one bucket of the table on both processes (global batch = 2 x the per-process size),
    # never an element-wise maximum of two processes' shapes
    from osum_jax.data.pipeline import BucketSpec

    cfg = load_config("configs/tiny.yaml", _overrides(speech_corpus, run, **common))
    table = {(2 * b, f, p, t) for b, f, p, t in BucketSpec.from_config(cfg.data, devices=1).shapes}
    summary = json.loads([line for line in outs[0].splitlines() if line.startswith("{")][-1])
    seen = {(feats[0], feats[1], prompt[1], target[1]) for feats, prompt, target in summary["batch_shapes"]}
    assert seen and seen <= table, (seen, table)
    assert sorted(expected) == [1, 2, 3, 4] and all(np.isfinite(v) for v in expected.values())
    (ev,) = _eval_rows(run)
    one = Trainer(load_config("configs/tiny.yaml", _overrides(speech_corpus, run, **common, **{
        "train.resume_data": "false"})), devices=jax.devices()[:1])
    one.open_checkpoints()
    assert one.restore_latest() and one.step == 4  # the data layout differs (1 process), so resume_data=false
    ref = one.evaluate()
    one.checkpointer.close()
    assert ev["eval/decoded_utterances"] == ref["eval/decoded_utterances"] >= len(speech_corpus["entries"]) - 2
    assert abs(ev["eval/loss"] - ref["eval/loss"]) <= 1e-5 * abs(ref["eval/loss"])
    assert sorted(p.name for p in (run / "checkpoints" / "2" / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    shutil.rmtree(run / "checkpoints" / "4")  # as if the run had died after its step-2 checkpoint
    before = len((run / "metrics.jsonl").read_text().splitlines())
    outs = _two_processes(speech_corpus, run, port + 1, **common)
    assert all("resumed from" in o for o in outs)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[before:]]
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}  # what the resumed run logged
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == expected[step], step


def test_compilation_cache_dir_stores_compiled_programs(tmp_path):
    """train.compilation_cache_dir: compiled programs land in the directory (a fresh process, no inherited cache)."""
    code = ("import sys, jax, jax.numpy as jnp\n"
            "from osum_jax.train.cli import enable_compilation_cache\n"
            "enable_compilation_cache(sys.argv[1])\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "print(float(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64)))))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    cache = tmp_path / "xla"
    res = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(p.name.startswith("jit_") for p in cache.iterdir()), sorted(cache.iterdir())


def test_tensorboard_tags_are_valid_and_distinct():
    from tensorboardX.summary import _clean_tag

    from osum_jax.train.metrics import tensorboard_tag

    names = ["loss", "eval/loss", "eval/<TRANSCRIBE>/wer", "eval/<TRANSCRIBE><GENDER>/gender_accuracy",
             "eval/<TRANSCRIBE> <AGE> <GENDER>/cer", "eval/<TRANSCRIBE><AGE><GENDER>/wer"]
    tags = [tensorboard_tag(n) for n in names]
    assert tags[2] == "eval/TRANSCRIBE/wer" and tags[3] == "eval/TRANSCRIBE-GENDER/gender_accuracy"
    assert all(_clean_tag(t) == t for t in tags)  # tensorboardX accepts them as they are
    assert len(set(tags)) == len(tags) and tags[4].startswith("eval/TRANSCRIBE-AGE-GENDER/")


@pytest.mark.slow
def test_data_running_out_still_saves_the_last_step(speech_corpus, tmp_path):
    """data.num_epochs=1 with more train.steps than the data covers: the run stops when the data ends and saves
    that step, although it is not a multiple of checkpoint_every."""
    import jax

    from osum_jax.config_loading import load_config
    from osum_jax.train.trainer import Trainer

    cfg = load_config("configs/tiny.yaml", _overrides(speech_corpus, tmp_path / "ep", **{
        "train.steps": 1000, "train.checkpoint_every": 1000, "data.num_epochs": 1}))
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    trainer.train()
    last = max(_losses(tmp_path / "ep"))
    assert 1 <= last < 1000
    assert [int(d.name) for d in (tmp_path / "ep" / "checkpoints").glob("*") if d.name.isdigit()] == [last]


def test_cluster_detection_for_distributed_start():
    """osum-train calls jax.distributed.initialize() by itself under the launchers JAX configures (a single
    process must not: it would wait for a coordinator)."""
    from osum_jax.train.cli import detected_cluster

    assert detected_cluster({}) == ""
    assert detected_cluster({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) == ""  # one task: a plain job
    assert detected_cluster({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}) == "SLURM"
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}) == "TPU slice"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) == ""  # a single-host TPU VM


@pytest.mark.slow  # two 12-step runs of the tiny model (~40 s)
def test_stop_below_loss_ends_the_run_at_the_first_window_under_it(speech_corpus, tmp_path):
    """train.stop_below_loss: the run ends, checkpointed, at the first step whose last stop_window losses average
    below the threshold. The step is worked out here from a full run's losses (training is deterministic)."""
    import jax

    from osum_jax.config import ConfigError
    from osum_jax.config_loading import load_config
    from osum_jax.train.trainer import Trainer

    common = {"train.steps": 12, "train.checkpoint_every": 1000, "train.learning_rate": 3e-3,
              "train.warmup_steps": 2, "train.fire_module": "all"}
    Trainer(load_config("configs/tiny.yaml", _overrides(speech_corpus, tmp_path / "full", **common)),
            devices=jax.devices()[:1]).train()
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(1, 13))
    window = 3
    means = {s: np.mean([full[s - i] for i in range(window)]) for s in range(window, 13)}
    threshold = float(means[6]) + 1e-6
    want = min(s for s, m in means.items() if m < threshold)
    assert want < 12
    summary = Trainer(load_config("configs/tiny.yaml", _overrides(
        speech_corpus, tmp_path / "early", **common, **{"train.stop_below_loss": threshold,
                                                        "train.stop_window": window})),
        devices=jax.devices()[:1]).train()
    early = _losses(tmp_path / "early")
    assert summary["stopped_early_at"] == want == max(early)
    assert early == {s: full[s] for s in range(1, want + 1)}
    assert [int(d.name) for d in (tmp_path / "early" / "checkpoints").glob("*") if d.name.isdigit()] == [want]
    for bad in ("train.stop_below_loss=-1", "train.stop_below_loss=nan", "train.stop_window=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("configs/tiny.yaml", [bad])
