"""Time and peak memory of ``osum-convert import-osum``, ``export-osum`` and ``export-torch`` on a synthetic
full-size OSUM ``.pt``.

    python scripts/bench_convert.py [--config configs/osum_full.yaml] [--layers N] [--workdir DIR] [--keep]

Builds a random bfloat16 checkpoint in OSUM's exact key layout (aliases sharing storage, as OSUM saves them;
~16 GB at full size), then runs each command in a fresh process and reports wall time, peak RSS (the
kernel's high-water mark, ``wait4`` ru_maxrss) and the peak of anonymous memory (``RssAnon`` sampled every
0.1 s; file-backed pages of memory-mapped files are reclaimable and not in it). ``--layers N`` scales the
Whisper and Qwen2 stacks down when the disk is too small (the script checks free space first: about
3x the checkpoint size is needed: source .pt, JAX checkpoint, exported .pt; the source is deleted before the
export to save space unless ``--verify``). ``--verify`` then checks, in another process, that the export
equals the source bit for bit (keys, order, dtypes, shapes, bytes, alias storage; loaded with ``mmap=True``)
and that every zip record's CRC-32 is right.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build_pt(cfg, path: Path, stage: Path) -> int:
    """Write the synthetic ``.pt``: tensors are staged in files and saved from file-backed storages."""
    import numpy as np
    import torch
    import ml_dtypes

    from osum_jax.checkpoint import model_shapes
    from osum_jax.convert.osum_pt import ALIASES, canonical_keys, extra_shapes, normalize_osum_key, osum_table

    shapes = model_shapes(cfg)
    by_key = {e.torch_key: e for e in osum_table(cfg.model)}
    rng = np.random.default_rng(0)
    pool = (0.02 * rng.standard_normal(32 << 20, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    state, total = {}, 0
    stage.mkdir(parents=True)
    for i, key in enumerate(canonical_keys(cfg.model)):
        if key in ALIASES:
            continue
        if key in extra_shapes(cfg.model):
            shape = extra_shapes(cfg.model)[key]
        else:
            e = by_key[normalize_osum_key(key)]
            js = shapes[e.jax_path]
            shape = e.external_shape(js)
        n = int(np.prod(shape))
        f = stage / f"{i:06d}.bin"
        with open(f, "wb") as fh:
            done = 0
            while done < n:
                k = min(n - done, pool.size)
                off = int(rng.integers(0, pool.size - k + 1))
                fh.write(pool[off:off + k].tobytes())
                done += k
        state[key] = torch.from_file(str(f), shared=False, size=n, dtype=torch.bfloat16).view(shape)
        total += 2 * n
    for alias, target in ALIASES.items():
        state[alias] = state[target]
    keys = canonical_keys(cfg.model)
    torch.save({k: state[k] for k in keys}, path)
    return total


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; wall time, ru_maxrss of that process, sampled peak RssAnon/RssFile."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    k = line.split(":")[0]
                    if k in peak:
                        peak[k] = max(peak[k], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return {"wall_s": wall, "maxrss_gib": usage.ru_maxrss / 2**20, "anon_gib": peak["RssAnon"] / 2**20,
            "file_gib": peak["RssFile"] / 2**20, "log": out.strip().splitlines()[-1] if out.strip() else ""}


def verify(src: Path, out: Path) -> str:
    """``out`` equals ``src`` bit for bit (mmap loads, one tensor at a time) and its CRC-32s are right."""
    import zipfile

    import torch

    a, b = torch.load(src, weights_only=True, mmap=True), torch.load(out, weights_only=True, mmap=True)
    assert list(a) == list(b), "keys or order differ"
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
    ptr = {}
    for k in b:
        ptr.setdefault(b[k].untyped_storage().data_ptr(), []).append(k)
    shared = sorted(tuple(v) for v in ptr.values() if len(v) > 1)
    del a, b
    with zipfile.ZipFile(out) as z:
        bad = z.testzip()
        assert bad is None, f"bad CRC-32: {bad}"
        n = len(z.infolist())
    return f"verified: {len(ptr)} storages bit-exact, shared {shared}, {n} zip records with correct CRC-32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/osum_full.yaml"))
    ap.add_argument("--layers", type=int, help="scale the encoder and LLM stacks down to N layers")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--verify", action="store_true", help="check the export against the source (bit-exact)")
    ap.add_argument("--build-only", help=argparse.SUPPRESS)  # internal: write the .pt in a child process
    ap.add_argument("--verify-only", nargs=2, help=argparse.SUPPRESS)  # internal: SRC OUT, in a child process
    args = ap.parse_args()
    if args.verify_only:
        print(verify(Path(args.verify_only[0]), Path(args.verify_only[1])))
        return
    from osum_jax.config_loading import load_config

    overrides = [] if args.layers is None else [f"model.encoder.num_layers={args.layers}",
                                                f"model.llm.num_layers={args.layers}"]
    cfg = load_config(args.config, overrides)
    if args.build_only:
        out = Path(args.build_only)
        print(build_pt(cfg, out, out.parent / "stage"))
        return
    m = cfg.model
    est = 2 * (m.llm.vocab_size * m.llm.hidden_size * 2 + m.llm.num_layers * (
        4 * m.llm.hidden_size ** 2 + 3 * m.llm.hidden_size * m.llm.intermediate_size)
        + m.encoder.num_layers * 12 * m.encoder.d_model ** 2)
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    free = shutil.disk_usage(work).free
    print(f"synthetic checkpoint ~{est / 2**30:.1f} GiB; free disk {free / 2**30:.1f} GiB at {work}", flush=True)
    if free < 3.1 * est:
        shutil.rmtree(work)
        raise SystemExit(f"not enough disk for ~{3.1 * est / 2**30:.0f} GiB; use --layers N to scale down")
    try:
        pt, ckpt, back = work / "infer.pt", work / "ckpt", work / "back.pt"
        t0 = time.perf_counter()
        # in a child: the measured processes are forked from this one, and a child's ru_maxrss starts at
        # its parent's RSS at fork time, so this process must stay small
        built = subprocess.run([sys.executable, __file__, "--config", args.config, "--build-only", str(pt)]
                               + (["--layers", str(args.layers)] if args.layers else []),
                               capture_output=True, text=True, check=True)
        nbytes = int(built.stdout.strip().splitlines()[-1])
        shutil.rmtree(work / "stage")
        print(f"built {pt} ({nbytes / 2**30:.2f} GiB of tensors, file {pt.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        cli = [sys.executable, "-m", "osum_jax.convert.cli"]
        extra = [f"{o}" for o in overrides]
        imp = run(cli + ["import-osum", "--allow-default-prompts", str(pt), "--config", args.config, "--out", str(ckpt), "--no-progress"]
                  + extra)
        ck_size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        print(f"import-osum: {imp['wall_s']:.0f} s, peak RSS {imp['maxrss_gib']:.2f} GiB (anonymous "
              f"{imp['anon_gib']:.2f} GiB, file-backed {imp['file_gib']:.2f} GiB); checkpoint "
              f"{ck_size / 2**30:.2f} GiB; {imp['log']}", flush=True)
        if not args.verify:
            pt.unlink()  # room for the export
        exp = run(cli + ["export-osum", str(ckpt), "--out", str(back), "--no-progress"])
        print(f"export-osum: {exp['wall_s']:.0f} s, peak RSS {exp['maxrss_gib']:.2f} GiB (anonymous "
              f"{exp['anon_gib']:.2f} GiB, file-backed {exp['file_gib']:.2f} GiB); {exp['log']}", flush=True)
        if args.verify:
            t0 = time.perf_counter()
            ok = subprocess.run([sys.executable, __file__, "--verify-only", str(pt), str(back)],
                                capture_output=True, text=True)
            if ok.returncode:
                raise SystemExit(f"verification failed:\n{ok.stdout[-2000:]}{ok.stderr[-4000:]}")
            print(f"{ok.stdout.strip()} ({time.perf_counter() - t0:.0f} s)", flush=True)
        back.unlink()  # room for the package
        from osum_jax.data.text import train_bpe_tokenizer

        tok = train_bpe_tokenizer(["transcribe the speech into text"], work / "tok", 300)
        pkg = work / "pkg"
        tex = run(cli + ["export-torch", str(ckpt), "--tokenizer", str(tok), "--out", str(pkg), "--dtype", "bf16",
                         "--no-progress"])
        pkg_size = sum(f.stat().st_size for f in pkg.iterdir())
        print(f"export-torch (bf16, LoRA merged): {tex['wall_s']:.0f} s, peak RSS {tex['maxrss_gib']:.2f} GiB "
              f"(anonymous {tex['anon_gib']:.2f} GiB, file-backed {tex['file_gib']:.2f} GiB); package "
              f"{pkg_size / 2**30:.2f} GiB in {len(list(pkg.glob('*.safetensors')))} safetensors shards; "
              f"{tex['log']}", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
