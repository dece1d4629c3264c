"""``osum-serve PKG [--device auto] [--host 127.0.0.1] [--port 8000]``: serve a torch package over HTTP.

    osum-serve pkg/osum --port 8000
    curl -F file=@a.wav -F task="<TRANSCRIBE><GENDER>" localhost:8000/v1/understand
    curl -F file=@a.wav -F response_format=srt localhost:8000/v1/audio/transcriptions   # OpenAI-compatible
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


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
    args = p.parse_args(argv)
    from ..modeling import OSUMForConditionalGeneration, PackageError
    from .app import Limits, create_app

    try:
        model = OSUMForConditionalGeneration.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    except (PackageError, RuntimeError, ValueError) as e:
        print(f"osum-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"osum-serve: {model.device}, {str(model.dtype).replace('torch.', '')} ({model.device_reason}); "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    import uvicorn

    app = create_app(model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                     limits=Limits(max_bytes=int(args.max_mb * (1 << 20)), max_seconds=args.max_seconds))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
