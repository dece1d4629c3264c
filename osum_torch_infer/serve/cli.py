r"""``osum-serve PKG [--device auto] [--host 127.0.0.1] [--port 8000]``: serve a torch package over HTTP.

    osum-serve pkg/osum --port 8000
    curl -F file=@a.wav --form-string "task=<TRANSCRIBE><GENDER>" localhost:8000/v1/understand
    # (--form-string: curl's -F reads a value that starts with "<" as a file name)
    curl -F file=@a.wav -F response_format=srt localhost:8000/v1/audio/transcriptions   # OpenAI-compatible
    curl -N -F file=@a.wav -F stream=true localhost:8000/v1/audio/transcriptions   # events as it is generated
    curl -F file=@long.wav -F response_format=verbose_json -F "timestamp_granularities[]=word" \
         localhost:8000/v1/audio/transcriptions   # segments (segment=vad|fixed) and word timestamps
    open http://localhost:8000/   # the web page: upload or record, pick a task, see the fields, give feedback
    OSUM_SERVE_API_KEY=... osum-serve pkg/osum --host 0.0.0.0 --allowed-origin https://asr.example.com
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


KEY_ENV = "OSUM_SERVE_API_KEY"


def _is_local(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serve_args(args) -> str:
    """What is wrong with the flags, checked before a model is loaded (``""``: nothing): sizes out of range, a
    non-local ``--host`` without a key (unless ``--insecure``), a malformed key or origin, a feedback log that
    cannot be appended to (else the first feedback would fail), a port already taken."""
    from .guard import normalize_origin

    defaults = {a.dest: a.default for a in _parser()._actions if a.dest != "help"}
    args = argparse.Namespace(**{**defaults, **vars(args)})  # callers may pass only some flags
    for flag, value, ok in (("--port", args.port, 0 <= args.port <= 65535), ("--max-batch", args.max_batch,
                            args.max_batch >= 1), ("--max-wait-ms", args.max_wait_ms, args.max_wait_ms >= 0),
                            ("--max-queue", args.max_queue, args.max_queue >= 1), ("--max-mb", args.max_mb,
                            args.max_mb > 0), ("--max-seconds", args.max_seconds, args.max_seconds > 0),
                            ("--max-connections", args.max_connections, args.max_connections >= 2),
                            ("--decode-workers", args.decode_workers, args.decode_workers >= 1),
                            ("--max-prompt-tokens", args.max_prompt_tokens, args.max_prompt_tokens >= 0),
                            ("--read-timeout", args.read_timeout, args.read_timeout > 0),
                            ("--request-timeout", args.request_timeout, args.request_timeout > 0),
                            ("--keep-alive", args.keep_alive, args.keep_alive >= 1),
                            ("--max-batch-seconds", args.max_batch_seconds, args.max_batch_seconds >= 0)):
        if not ok:
            return f"{flag} {value:g} is out of range"
    from ..features import MAX_SECONDS
    from .audio import max_windows

    need = max_windows(args.max_seconds, MAX_SECONDS)
    if args.max_queue < need:
        return (f"--max-queue {args.max_queue} is below the {need} windows of one {args.max_seconds:g} s request "
                f"(--max-seconds); raise it or lower --max-seconds")
    if args.api_key is not None:
        key = args.api_key
        if len(key) < 16 or not key.isascii() or not key.isprintable() or " " in key:
            return "the API key must be at least 16 printable ASCII characters without spaces"
    if not _is_local(args.host) and args.api_key is None and not args.insecure:
        return (f"--host {args.host} accepts connections from other machines: give an API key (--api-key KEY or "
                f"{KEY_ENV}), or --insecure to serve without one")
    for origin in args.allowed_origin:
        if normalize_origin(origin) is None:
            return f"--allowed-origin {origin!r}: expected scheme://host[:port], e.g. https://asr.example.com"
    if args.feedback_log:
        log = os.path.abspath(args.feedback_log)
        folder = os.path.dirname(log)
        if not os.path.isdir(folder):
            return f"--feedback-log {args.feedback_log}: no such folder {folder}"
        if os.path.isdir(log) or (os.path.exists(log) and not os.access(log, os.W_OK)) or \
                not os.access(folder, os.W_OK | os.X_OK):
            return f"--feedback-log {args.feedback_log}: cannot append to it"
    if args.replicas:
        from ..devices import ray_device_options

        for flag, value in (("--gpus-per-replica", args.gpus_per_replica),
                            ("--npus-per-replica", args.npus_per_replica)):
            if value is not None and value < 0:
                return f"{flag} {value:g} is out of range"
        per = args.gpus_per_replica if str(args.device).startswith("cuda") else args.npus_per_replica
        try:  # the cluster's resources are checked once Ray runs
            ray_device_options(args.device, None, workers=args.replicas, per_worker=per)
        except ValueError as e:
            return str(e)
    if not args.replicas:
        import socket

        try:
            with socket.create_server((args.host, args.port)):
                pass
        except OSError as e:
            return f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"
    return ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osum-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="package directory written by osum-convert export-torch")
    p.add_argument("--device", default="auto", help="auto | cuda[:N] | npu[:N] | cpu")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    from ..cli import KEEP_FP32_HELP

    p.add_argument("--keep-fp32", metavar="auto|REPORT.json|NAMES", help=KEEP_FP32_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: localhost only; any other needs --api-key or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    a = p.add_argument_group("access (docs/serving.md, Security)")
    a.add_argument("--api-key", default=os.environ.get(KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health and the page (default: "
                        f"${KEY_ENV}; none on localhost). Prefer the variable: a flag shows in ps")
    a.add_argument("--insecure", action="store_true",
                   help="allow a non-localhost --host without an API key (anyone who reaches the port can use it)")
    a.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed besides the server's own, e.g. https://asr.example.com (the "
                        "public address behind a proxy); repeatable. Its host is also accepted in Host headers")
    a.add_argument("--feedback-log", default=None,
                   help="JSONL file the web page's correct/wrong feedback is appended to (default: none, and "
                        "POST /v1/feedback answers 403)")
    b = p.add_argument_group("batching and limits (docs/serving.md, Limits)")
    b.add_argument("--max-batch", type=int, default=8,
                   help="rows (windows x beams) per generate call at most (default 8)")
    b.add_argument("--max-batch-seconds", type=float, default=0.0,
                   help="padded audio seconds per generate call (windows x the longest; 0, the default: no limit "
                        "but --max-batch). Lower it so a long request's 30 s windows go in smaller calls and short "
                        "requests arriving meanwhile wait less")
    b.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others (default 10 ms)")
    b.add_argument("--max-queue", type=int, default=64,
                   help="windows waiting at most; a request that would pass it gets 503 (default 64)")
    b.add_argument("--max-mb", type=float, default=25.0, help="largest upload in MB (default 25)")
    b.add_argument("--max-seconds", type=float, default=600.0,
                   help="longest audio in seconds, read from the header before decoding (default 600)")
    b.add_argument("--max-prompt-tokens", type=int, default=0,
                   help="longest free prompt in tokens (default 0: the longest prompt of the package's prompt file)")
    b.add_argument("--decode-workers", type=int, default=2,
                   help="threads decoding audio and computing log-mel (default 2)")
    b.add_argument("--max-connections", type=int, default=64,
                   help="uvicorn's limit_concurrency: a new request when this many connections or requests are "
                        "open gets 503 (default 64)")
    b.add_argument("--read-timeout", type=float, default=10.0,
                   help="seconds allowed for a request's headers, and between two pieces of its body (408; "
                        "default 10)")
    b.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds from a request's headers to its answer, upload and queue included (504, its "
                        "queued work cancelled; default 300)")
    b.add_argument("--keep-alive", type=int, default=5,
                   help="seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive; default 5)")
    r = p.add_argument_group("replicas")
    r.add_argument("--replicas", type=int, default=0,
                   help="run N replicas behind Ray Serve (needs the .[ray] extra; default: one process, no Ray)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=None,
                   help="Ray GPUs per replica with --device cuda (default 1: each replica its own GPU; a fraction "
                        "shares one)")
    r.add_argument("--npus-per-replica", type=float, default=None,
                   help="Ray NPU resources per replica with --device npu (default 1: each replica its own NPU, "
                        "through ASCEND_RT_VISIBLE_DEVICES; a fraction shares one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    problem = check_serve_args(args)
    if problem:
        print(f"osum-serve: error: {problem}", file=sys.stderr)
        return 2
    from ..loading import load_model
    from ..modeling import PackageError
    from .app import Limits, create_app
    from .guard import normalize_origin

    limits = Limits(max_bytes=int(args.max_mb * (1 << 20)), max_seconds=args.max_seconds,
                    max_prompt_tokens=args.max_prompt_tokens, decode_workers=args.decode_workers,
                    max_batch_seconds=args.max_batch_seconds,
                    read_timeout=args.read_timeout, request_timeout=args.request_timeout)
    app_kwargs = dict(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      limits=limits, feedback_log=os.path.abspath(args.feedback_log) if args.feedback_log else None,
                      api_key=args.api_key, allowed_origins=tuple(normalize_origin(o) for o in args.allowed_origin))
    if args.replicas:
        if args.replicas < 1:
            print("osum-serve: error: --replicas must be >= 1", file=sys.stderr)
            return 2
        try:
            import ray  # noqa: F401
            from ray import serve  # noqa: F401
        except ImportError:
            print('osum-serve: error: --replicas needs Ray Serve: pip install -e ".[ray]"', file=sys.stderr)
            return 2
        from .ray_serve import run

        if not os.path.isfile(os.path.join(args.model, "config.json")):
            print(f"osum-serve: error: {args.model}: not a package directory (no config.json)", file=sys.stderr)
            return 2
        if args.keep_fp32:  # checked here (names, the report) rather than in every replica
            from pathlib import Path

            from ..loading import keep_fp32_modules
            from ..package import PackageConfig

            try:
                pkg = PackageConfig.from_json(Path(args.model) / "config.json")
                keep_fp32_modules(args.keep_fp32, args.model, int(pkg.text_config.get("num_hidden_layers", 0)))
            except ValueError as e:
                print(f"osum-serve: error: {e}", file=sys.stderr)
                return 2
        try:
            run(args.model, host=args.host, port=args.port, replicas=args.replicas,
                cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                npus_per_replica=args.npus_per_replica, device=args.device, dtype=args.dtype, app_kwargs=app_kwargs,
                keep_fp32=args.keep_fp32)
        except ValueError as e:  # the replicas' devices against the cluster (PackageError is a ValueError)
            print(f"osum-serve: error: {e}", file=sys.stderr)
            return 2
        return 0

    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype, keep_fp32=args.keep_fp32)
    except (PackageError, RuntimeError, ValueError) as e:
        print(f"osum-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from .protocol import protocol_class

    app = create_app(model, **app_kwargs)
    access = "API key required" if args.api_key else ("no API key (--insecure)" if not _is_local(args.host)
                                                     else "no API key (localhost only)")
    print(f"osum-serve: {model.device}, {str(model.dtype).replace('torch.', '')} ({model.device_reason}); "
          f"{access}; feedback {'to ' + args.feedback_log if args.feedback_log else 'off'}; "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=protocol_class(args.read_timeout),
                ws="none", limit_concurrency=args.max_connections, timeout_keep_alive=args.keep_alive,
                h11_max_incomplete_event_size=16 << 10, server_header=False, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
