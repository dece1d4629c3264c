"""osum-serve's dynamic batching, measured over real HTTP: N concurrent clients vs the same N requests one at a time,
and a mixed load where one long request arrives with the short ones.

The server is started for real (``osum-serve PKG --device cpu``) on a free localhost port; the requests are the
same ``--requests`` distinct clips (1-3 s of noise, fixed ``max_new_tokens``) in every phase:

* **one at a time**: one client sends request i+1 when request i has answered (each decodes as a batch of 1);
* **concurrent**: ``--requests`` clients send at once; the server groups them into ``generate`` calls of up to
  ``--max-batch`` rows (waiting up to ``--max-wait-ms`` for company);
* **mixed**: one ``--long-seconds`` request (20 windows of 30 s for 600 s) is sent first, with ``--requests - 1``
  of the short clips right behind it; the short requests' p95 latency is compared with the concurrent phase's
  (the long request's windows must not hold the short ones back: the batcher serves the shortest requests first
  and never pads a batch of short windows to a 30 s one).

The concurrent and mixed phases run ``--repeats`` times (each repeat: concurrent, then mixed), and the report
gives every repeat, so the spread is visible. Checks (exit status 1 if one fails): identical texts in every
phase, throughput ratio (one-at-a-time seconds / concurrent seconds) >= 3 in every repeat, and short p95 in the
mixed phase <= 2x the concurrent phase's in every repeat. The package is ``--package`` or a random model of
``--config`` (default ``configs/small.yaml``) exported as in ``bench_infer.py``.

    python scripts/bench_serve.py [--package PKG | --config configs/small.yaml] [--requests 32] [--max-batch 32]
                                  [--long-seconds 600] [--repeats 3] [--json out.json]
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
    ap.add_argument("--long-seconds", type=float, default=600.0, help="the mixed phase's long request (0: no mixed)")
    ap.add_argument("--max-batch-seconds", type=float, default=96.0,
                    help="osum-serve --max-batch-seconds (default 96: one batch of the 32 short clips, 3 s padded)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the concurrent and mixed phases")
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
    long_s = max(args.long_seconds, 1.0)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "osum-serve"), str(pkg), "--device", "cpu",
                             "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
                             str(args.max_wait_ms), "--max-queue", str(4 * args.requests + 64), "--max-seconds",
                             str(long_s), "--max-mb", str(max(25.0, long_s * 32000 / 2 ** 20 + 1)),
                             "--request-timeout", "3600", "--max-batch-seconds", str(args.max_batch_seconds),
                             "--max-connections", str(2 * args.requests + 16)],
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
        long_wave = _wav(long_s, seed=10_000) if args.long_seconds > 0 else None
        client = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=args.requests + 4))

        def ask(wave: bytes) -> tuple[str, float]:
            t0 = time.perf_counter()
            r = client.post(url + "/v1/understand", files={"file": ("a.wav", wave, "audio/wav")},
                            data={"max_new_tokens": str(args.new_tokens)})
            r.raise_for_status()
            return r.json()["text"], time.perf_counter() - t0

        def batches() -> int:
            return client.get(url + "/health").json()["batches"]

        ask(waves[0])  # warm-up: first-call allocations
        if long_wave is not None:
            ask(long_wave)  # and the long windows' shapes
        b0 = batches()
        t0 = time.perf_counter()
        one = [ask(w) for w in waves]
        t_one = time.perf_counter() - t0
        one_batches = batches() - b0
        runs = []
        for _ in range(args.repeats):
            b0 = batches()
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.requests) as ex:
                together = list(ex.map(ask, waves))
            t_together = time.perf_counter() - t0
            run = {"concurrent": {"seconds": t_together, "req_per_s": args.requests / t_together,
                                  "p50_s": statistics.median(b[1] for b in together),
                                  "p95_s": _percentile([b[1] for b in together], 0.95), "batches": batches() - b0},
                   "throughput_ratio": t_one / t_together,
                   "identical": [a[0] for a in one] == [b[0] for b in together]}
            if long_wave is not None:
                b0 = batches()
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(args.requests) as ex:
                    long_f = ex.submit(ask, long_wave)
                    shorts = list(ex.map(ask, waves[:args.requests - 1]))
                    long_r = long_f.result()
                lat = [b[1] for b in shorts]
                run["mixed"] = {"seconds": time.perf_counter() - t0, "short_p50_s": statistics.median(lat),
                                "short_p95_s": _percentile(lat, 0.95), "long_s": long_r[1], "batches": batches() - b0}
                run["mixed_p95_ratio"] = run["mixed"]["short_p95_s"] / run["concurrent"]["p95_s"]
                run["identical"] = run["identical"] and [a[0] for a in one[:args.requests - 1]] == \
                    [b[0] for b in shorts]
            runs.append(run)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lat_one = [a[1] for a in one]
    same = all(r["identical"] for r in runs)
    ratios = [r["throughput_ratio"] for r in runs]
    mixed = [r["mixed_p95_ratio"] for r in runs if "mixed_p95_ratio" in r]
    r = {
        "package": str(pkg if args.package else args.config), "requests": args.requests,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "new_tokens": args.new_tokens,
        "long_seconds": args.long_seconds, "repeats": args.repeats,
        "one_at_a_time": {"seconds": t_one, "req_per_s": args.requests / t_one,
                          "p50_s": statistics.median(lat_one), "p95_s": _percentile(lat_one, 0.95),
                          "batches": one_batches},
        "runs": runs, "identical_outputs": same,
        "throughput_ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
        "mixed_p95_ratio": {"min": min(mixed), "median": statistics.median(mixed), "max": max(mixed)} if mixed
        else None,
    }
    o = r["one_at_a_time"]
    print(f"{'mode':22s} {'req/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'batches':>8s}")
    print(f"{'one at a time':22s} {o['req_per_s']:7.2f} {o['p50_s']:7.3f} {o['p95_s']:7.3f} {o['batches']:8d}")
    for i, run in enumerate(runs, 1):
        c = run["concurrent"]
        print(f"{f'concurrent #{i}':22s} {c['req_per_s']:7.2f} {c['p50_s']:7.3f} {c['p95_s']:7.3f} {c['batches']:8d}"
              f"   throughput ratio {run['throughput_ratio']:.2f}x")
        if "mixed" in run:
            m = run["mixed"]
            print(f"{f'mixed #{i} (shorts)':22s} {'':7s} {m['short_p50_s']:7.3f} {m['short_p95_s']:7.3f} "
                  f"{m['batches']:8d}   short p95 / concurrent p95 {run['mixed_p95_ratio']:.2f}x; "
                  f"long request {m['long_s']:.2f} s")
    tr = r["throughput_ratio"]
    print(f"throughput ratio {tr['min']:.2f}-{tr['max']:.2f}x (median {tr['median']:.2f}x); identical outputs: {same}")
    ok = same and tr["min"] >= 3.0
    if mixed:
        mr = r["mixed_p95_ratio"]
        print(f"mixed short p95 ratio {mr['min']:.2f}-{mr['max']:.2f}x (median {mr['median']:.2f}x)")
        ok = ok and mr["max"] <= 2.0
    print("checks: " + ("pass" if ok else "FAIL") + " (identical outputs, throughput ratio >= 3x, mixed p95 <= 2x)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
