"""osum-serve's dynamic batching, measured over real HTTP: N concurrent clients vs the same N requests one at a time.

The server is started for real (``osum-serve PKG --device cpu``) on a free localhost port; the requests are the
same ``--requests`` distinct clips (1-3 s of noise, fixed ``max_new_tokens``) both ways:

* **one at a time**: one client sends request i+1 when request i has answered (each decodes as a batch of 1);
* **concurrent**: ``--requests`` clients send at once; the server groups them into batches of up to
  ``--max-batch`` windows (waiting up to ``--max-wait-ms`` for company).

Reports requests/s of each, the ratio, p50/p95 latency of each, the number of batched ``generate`` calls, and
checks that every request got the same text both ways. The package is ``--package`` or a random model of
``--config`` (default ``configs/small.yaml``) exported as in ``bench_infer.py``.

    python scripts/bench_serve.py [--package PKG | --config configs/small.yaml] [--requests 32] [--max-batch 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402


def _wav(seconds: float, seed: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    x = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    sf.write(buf, x, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", help="a torch package (default: a random model of --config)")
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    import httpx

    tmp = tempfile.TemporaryDirectory()
    if args.package:
        pkg = Path(args.package)
    else:
        from bench_infer import build_packages

        pkg, _ = build_packages(str(ROOT / args.config), Path(tmp.name))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "osum-serve"), str(pkg), "--device", "cpu",
                             "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
                             str(args.max_wait_ms), "--max-queue", str(4 * args.requests), "--feedback-log", ""],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read())
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise SystemExit("osum-serve did not start") from None
                time.sleep(0.3)
        waves = [_wav(1.0 + 2.0 * (i % 5) / 4, seed=i) for i in range(args.requests)]
        client = httpx.Client(timeout=600)

        def ask(wave: bytes) -> tuple[str, float]:
            t0 = time.perf_counter()
            r = client.post(url + "/v1/understand", files={"file": ("a.wav", wave, "audio/wav")},
                            data={"max_new_tokens": str(args.new_tokens)})
            r.raise_for_status()
            return r.json()["text"], time.perf_counter() - t0

        ask(waves[0])  # warm-up: first-call allocations
        before = client.get(url + "/health").json()
        t0 = time.perf_counter()
        one = [ask(w) for w in waves]
        t_one = time.perf_counter() - t0
        mid = client.get(url + "/health").json()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.requests) as ex:
            together = list(ex.map(ask, waves))
        t_together = time.perf_counter() - t0
        after = client.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    same = [a[0] for a in one] == [b[0] for b in together]
    lat_one, lat_tog = [a[1] for a in one], [b[1] for b in together]
    r = {
        "package": str(pkg if args.package else args.config), "requests": args.requests,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "new_tokens": args.new_tokens,
        "one_at_a_time": {"seconds": t_one, "req_per_s": args.requests / t_one,
                          "p50_s": statistics.median(lat_one), "p95_s": _percentile(lat_one, 0.95),
                          "batches": mid["batches"] - before["batches"]},
        "concurrent": {"seconds": t_together, "req_per_s": args.requests / t_together,
                       "p50_s": statistics.median(lat_tog), "p95_s": _percentile(lat_tog, 0.95),
                       "batches": after["batches"] - mid["batches"]},
        "throughput_ratio": t_one / t_together, "identical_outputs": same,
    }
    o, c = r["one_at_a_time"], r["concurrent"]
    print(f"{'mode':14s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'batches':>8s}")
    print(f"{'one at a time':14s} {o['req_per_s']:7.2f} {o['p50_s']:7.3f} {o['p95_s']:7.3f} {o['batches']:8d}")
    print(f"{'concurrent':14s} {c['req_per_s']:7.2f} {c['p50_s']:7.3f} {c['p95_s']:7.3f} {c['batches']:8d}")
    print(f"throughput ratio {r['throughput_ratio']:.2f}x; identical outputs: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1), encoding="utf-8")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
