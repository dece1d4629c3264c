"""``osum-serve PKG [--device auto] [--host 127.0.0.1] [--port 8000]``: serve a torch package over HTTP.

    osum-serve pkg/osum --port 8000
    curl -F file=@a.wav --form-string "task=<TRANSCRIBE><GENDER>" localhost:8000/v1/understand
    # (--form-string: curl's -F reads a value that starts with "<" as a file name)
    curl -F file=@a.wav -F response_format=srt localhost:8000/v1/audio/transcriptions   # OpenAI-compatible
    open http://localhost:8000/   # the web page: upload or record, pick a task, see the fields, give feedback
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def check_serve_args(args) -> str:
    """What is wrong with the flags, checked before a model is loaded (``""``: nothing): sizes out of range, a
    feedback log that cannot be appended to (else the first feedback would fail), a port already taken."""
    for flag, value, ok in (("--port", args.port, 0 <= args.port <= 65535), ("--max-batch", args.max_batch,
                            args.max_batch >= 1), ("--max-wait-ms", args.max_wait_ms, args.max_wait_ms >= 0),
                            ("--max-queue", args.max_queue, args.max_queue >= 1), ("--max-mb", args.max_mb,
                            args.max_mb > 0), ("--max-seconds", args.max_seconds, args.max_seconds > 0)):
        if not ok:
            return f"{flag} {value:g} is out of range"
    if args.feedback_log:
        log = os.path.abspath(args.feedback_log)
        folder = os.path.dirname(log)
        if not os.path.isdir(folder):
            return f"--feedback-log {args.feedback_log}: no such folder {folder}"
        if os.path.isdir(log) or (os.path.exists(log) and not os.access(log, os.W_OK)) or \
                not os.access(folder, os.W_OK | os.X_OK):
            return f"--feedback-log {args.feedback_log}: cannot append to it"
    if not args.replicas:
        import socket

        try:
            with socket.create_server((args.host, args.port)):
                pass
        except OSError as e:
            return f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osum-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="package directory written by osum-convert export-torch")
    p.add_argument("--device", default="auto", help="auto | cuda[:N] | npu[:N] | cpu")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="windows decoded together at most (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others (default 10 ms)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503 (default 64)")
    p.add_argument("--max-mb", type=float, default=25.0, help="largest upload in MB (default 25)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="longest audio in seconds (default 600)")
    p.add_argument("--feedback-log", default="osum_feedback.jsonl",
                   help="JSONL file the web page's correct/wrong feedback is appended to (default "
                        "osum_feedback.jsonl; an empty string turns feedback off)")
    p.add_argument("--replicas", type=int, default=0,
                   help="run N replicas behind Ray Serve (needs the .[ray] extra; default: one process, no Ray)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per replica (default 0)")
    args = p.parse_args(argv)
    problem = check_serve_args(args)
    if problem:
        print(f"osum-serve: error: {problem}", file=sys.stderr)
        return 2
    from ..modeling import OSUMForConditionalGeneration, PackageError
    from .app import Limits, create_app

    limits = Limits(max_bytes=int(args.max_mb * (1 << 20)), max_seconds=args.max_seconds)
    app_kwargs = dict(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      limits=limits, feedback_log=os.path.abspath(args.feedback_log) if args.feedback_log else None)
    if args.replicas:
        if args.replicas < 1:
            p.error("--replicas must be >= 1")
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
        run(args.model, host=args.host, port=args.port, replicas=args.replicas,
            cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica, device=args.device,
            dtype=args.dtype, app_kwargs=app_kwargs)
        return 0

    try:
        model = OSUMForConditionalGeneration.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    except (PackageError, RuntimeError, ValueError) as e:
        print(f"osum-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"osum-serve: {model.device}, {str(model.dtype).replace('torch.', '')} ({model.device_reason}); "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    import uvicorn

    app = create_app(model, **app_kwargs)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
