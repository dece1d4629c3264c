"""The HTTP API (FastAPI): ``POST /v1/understand``, the OpenAI-compatible ``POST /v1/audio/transcriptions``,
``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/feedback`` (only with a feedback log), and the
web page at ``GET /`` (``static/index.html``).

Every non-2xx answer is one JSON object ``{"error": "<one line>"}`` with a fitting status: user mistakes are
4xx, framework errors (404, 405, bad multipart, bad fields) too; anything unexpected is logged with its traceback
and answered ``500 {"error": "internal error"}``. A full queue is 503 with ``Retry-After``. Access control, body
limits, timeouts and cancellation are :mod:`.guard`'s; the work per request is bounded here: the audio header is
checked before decoding, decoding and log-mel run in a bounded worker pool, prompts are bounded in tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..features import HOP, MAX_SECONDS, SAMPLE_RATE, AudioError, log_mel_spectrogram
from ..formats.preset import DECODINGS
from ..formats.prompts import prompt_text
from ..parsing import normalize_task
from ..segment import MODES as SEGMENT_MODES, join_segments, segment_audio, to_srt, to_vtt, verbose_json
from .audio import TooLong, WorkerPool, decode_bounded, max_windows
from .batcher import Batcher, QueueFull
from .guard import Guard, Policy, one_line
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .streaming import DEADLINE_KEY, Progress, Stream, events

log = logging.getLogger("osum.serve")
PAGE = Path(__file__).with_name("static") / "index.html"
FEEDBACK_FIELDS = {"verdict": str, "audio": str, "task": str, "prompt": str, "decoding": str, "result": str,
                   "transcript": str, "tags": dict, "comment": str}
FEEDBACK_BYTES, FEEDBACK_DEPTH, FEEDBACK_TAGS = 64 << 10, 3, 64
FORM_OVERHEAD = 1 << 20  # multipart framing and the text fields, on top of --max-mb
STATUS_TEXT = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found",
               405: "method not allowed", 406: "not acceptable", 408: "request timeout", 413: "content too large",
               415: "unsupported media type", 422: "unprocessable content", 429: "too many requests"}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 25 << 20  # upload size
    max_seconds: float = 600.0  # audio duration (longer audio is split into 30 s windows below this)
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 0  # a free prompt's tokens; 0: the longest prompt of the package's prompt file
    max_batch_seconds: float = 0.0  # padded audio seconds per generate call (0: no limit but max_batch)
    decode_workers: int = 2  # audio decode + log-mel threads
    read_timeout: float = 10.0  # seconds without a body byte -> 408
    request_timeout: float = 300.0  # seconds from headers to answer -> 504


class UserError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.reason = status, message, headers, reason


def _json_error(status: int, message: Any, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def _name(filename: str | None) -> str:
    """An uploaded file's name as it may appear in a message: its last path part, printable, short."""
    base = re.split(r"[\\/]", filename or "upload")[-1]
    base = "".join(c for c in base if c.isprintable())[:80]
    return base or "upload"


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0)."""
    if isinstance(obj, dict):
        return 1 + max((_depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((_depth(v) for v in obj), default=0)
    return 0


def _strict_json(raw: bytes) -> Any:
    """``json.loads`` that refuses NaN/Infinity, repeated keys and lone surrogates (ValueError)."""
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("a key appears twice")
        return dict(items)

    obj = json.loads(raw.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=pairs)
    json.dumps(obj, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError on lone surrogates
    return obj


def create_app(model, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
               limits: Limits = Limits(), feedback_log: str | os.PathLike | None = None,
               api_key: str | None = None, allowed_origins: tuple[str, ...] = ()) -> FastAPI:
    """The app over a loaded package. ``max_batch``: rows (windows x beams) per ``generate`` call;
    ``max_queue``: queued windows; ``feedback_log``: JSONL file the page's correct/wrong buttons append to
    (``None``: no feedback endpoint); ``api_key``: required as ``Authorization: Bearer`` on every endpoint but
    ``/health`` and the page; ``allowed_origins``: browser origins besides the server's own."""
    n_windows = max_windows(limits.max_seconds, MAX_SECONDS)
    if max_queue < n_windows:
        raise ValueError(f"max_queue {max_queue} < the {n_windows} windows of {limits.max_seconds:g} s of audio")
    metrics_box: list[Metrics] = []
    batcher = Batcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      max_frames=int(limits.max_batch_seconds * SAMPLE_RATE / HOP),
                      on_batch=lambda *a: metrics_box[0].on_batch(*a),
                      on_retry=lambda: metrics_box[0].retries.inc())
    metrics = Metrics(max_batch=max_batch, queue_windows=lambda: batcher.queued_windows)
    metrics_box.append(metrics)
    pool = WorkerPool(limits.decode_workers)
    feedback_lock = asyncio.Lock()
    rows_per_window = {d: max(1, int(model.decoding_config(d).num_beams or 1)) for d in DECODINGS}
    prompt_limit = limits.max_prompt_tokens or max(
        [len(model.encode_text(t)) for ps in model.prompts.values() for t in map(prompt_text, ps) if t] or [1])
    n_mels = model.config.encoder.num_mel_bins

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        pool.shutdown()

    app = FastAPI(title="osum-serve", lifespan=lifespan, docs_url=None, redoc_url=None)  # no CDN assets
    app.state.batcher = batcher
    app.state.metrics = metrics
    policy = Policy(api_key=api_key, allowed_origins=tuple(allowed_origins),
                    body_limits={"/v1/understand": limits.max_bytes + FORM_OVERHEAD,
                                 "/v1/audio/transcriptions": limits.max_bytes + FORM_OVERHEAD,
                                 "/v1/feedback": FEEDBACK_BYTES},
                    read_timeout=limits.read_timeout, request_timeout=limits.request_timeout)
    app.add_middleware(Guard, policy=policy, metrics=metrics)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        if e.reason:
            metrics.rejected.labels(e.reason).inc()
        return _json_error(e.status, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _json_error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) and e.detail else STATUS_TEXT.get(e.status_code, "error")
        if e.status_code in (404, 405):
            detail = STATUS_TEXT[e.status_code]
        elif detail == "There was an error parsing the body":  # FastAPI's words for a broken multipart body
            detail = "cannot parse the request body (broken multipart form)"
        return _json_error(e.status_code, detail, e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # Starlette re-raises it: uvicorn logs the traceback
        return _json_error(500, "internal error")

    def _prepare(f, task: str, prompt: str | None, context: str | None, segment: str = "vad") -> dict:
        """In a pool thread: the prompt's ids (bounded), then the audio (header first), its segments (``vad``: cut
        at pauses when over 30 s; ``fixed``: equal windows) and their log-mel."""
        if prompt is not None or context is not None:
            free = prompt if prompt is not None else context
            if len(free) > 64 * prompt_limit:
                raise UserError(400, f"prompt of {len(free)} characters is longer than the package's prompt "
                                     f"limit of {prompt_limit} tokens", reason="prompt_too_long")
            n = len(model.encode_text(free))
            if n > prompt_limit:
                raise UserError(400, f"prompt has {n} tokens > the package's prompt limit of {prompt_limit} "
                                     f"(--max-prompt-tokens)", reason="prompt_too_long")
        if prompt is None:
            try:
                instruction = model.prompt_for(task)
            except ValueError as e:
                raise UserError(400, str(e)) from None
            prompt = f"{context.strip()} {instruction}".strip() if context and context.strip() else instruction
        ids = model.encode_text(prompt)
        try:
            wave = decode_bounded(f, limits.max_seconds)
            metrics.decoded.inc(len(wave) / 16000.0)
            try:
                segments = segment_audio(wave, SAMPLE_RATE, mode=segment, max_seconds=MAX_SECONDS)
            except RuntimeError as e:  # the VAD is not installed here: says what to install, or segment=fixed
                raise UserError(400, f"segment=vad: {e}") from None
            if len(segments) > batcher.max_queue:
                raise UserError(413, f"the audio splits into {len(segments)} segments > the {batcher.max_queue} "
                                     f"windows the server queues (--max-queue); try segment=fixed",
                                reason="audio_too_long")
            windows = [(s.start, log_mel_spectrogram(s.samples, n_mels)) for s in segments]
        except TooLong as e:
            raise UserError(413, str(e), reason="audio_too_long") from None
        except AudioError as e:
            raise UserError(400, str(e), reason="bad_audio") from None
        spans = [{"start": s.start, "end": s.end, "cut_in_speech": s.cut_in_speech} for s in segments]
        return {"prompt": prompt, "ids": ids, "windows": windows, "segments": spans, "segment": segment,
                "seconds": len(wave) / 16000.0}

    async def admit(file: UploadFile, task: str | None, prompt: str | None, decoding: str,
                    max_new_tokens: int | None, context: str | None = None,
                    segment: str | None = None) -> tuple[str, dict, dict]:
        """Checks, then the audio and prompt prepared: ``(task, prep, settings)``."""
        name = _name(file.filename)
        segment = segment or "vad"
        if segment not in SEGMENT_MODES:
            raise UserError(400, f"segment {segment[:40]!r}: expected one of {list(SEGMENT_MODES)}")
        if decoding not in DECODINGS:
            raise UserError(400, f"decoding {decoding[:40]!r}: expected one of {list(DECODINGS)}")
        if max_new_tokens is not None and not 1 <= max_new_tokens <= limits.max_new_tokens:
            raise UserError(400, f"max_new_tokens must lie in [1, {limits.max_new_tokens}]")
        if task is not None and len(task) > 200:
            raise UserError(400, "task is longer than 200 characters")
        file.file.seek(0, os.SEEK_END)  # the spooled upload (in memory or on disk), bounded by the guard
        size = file.file.tell()
        file.file.seek(0)
        if size > limits.max_bytes:
            raise UserError(413, f"upload larger than {limits.max_bytes} bytes", reason="body_too_large")
        if not size:
            raise UserError(400, f"{name}: empty upload")
        task = normalize_task(task)
        prompt = prompt if prompt else None
        try:
            prep = await pool.run(_prepare, file.file, task, prompt, context, segment)
        except UserError as e:
            e.message = f"{name}: {e.message}" if e.reason in ("bad_audio", "audio_too_long") else e.message
            raise
        settings: dict[str, Any] = {"decoding": decoding}
        if max_new_tokens is not None:
            settings["max_new_tokens"] = int(max_new_tokens)
        return task, prep, settings

    def enqueue(prep: dict, settings: dict, on_update=None):
        try:
            return batcher.enqueue([(f, prep["ids"]) for _, f in prep["windows"]], settings,
                                   rows_per_window[settings["decoding"]], on_update=on_update)
        except QueueFull as e:
            raise UserError(503, f"server busy: {e}", headers={"Retry-After": "1"}, reason="queue_full") from None
        except ValueError as e:
            raise UserError(400, str(e)) from None

    def finish(task: str, prep: dict, texts: list[str]) -> dict:
        """The joined result (:func:`..segment.join_segments`: offsets, de-duplicated overlaps, ``segments``,
        ``words`` for ``<ALIGN>``) and the request's windows."""
        windows = prep["windows"]
        result = join_segments(prep["segments"], texts, task)
        return {**result, "task": task, "prompt": prep["prompt"], "segment": prep["segment"],
                "windows": len(windows), "window_offsets": [off for off, _ in windows], "window_texts": texts,
                "seconds": prep["seconds"]}

    async def understand(file: UploadFile, task: str | None, prompt: str | None, decoding: str,
                         max_new_tokens: int | None, context: str | None = None, segment: str | None = None):
        task, prep, settings = await admit(file, task, prompt, decoding, max_new_tokens, context, segment)
        texts = await batcher.result(enqueue(prep, settings))
        return finish(task, prep, texts)

    async def stream(request: Request, kind: str, file: UploadFile, task: str | None, prompt: str | None,
                     decoding: str, max_new_tokens: int | None, context: str | None = None,
                     segment: str | None = None) -> Stream:
        """``stream=true``: checked and queued like any request (errors are still one JSON line with a 4xx or
        503), then answered as server-sent events (:mod:`.streaming`)."""
        task, prep, settings = await admit(file, task, prompt, decoding, max_new_tokens, context, segment)
        progress = Progress(prep["segments"], task, model.decode_text)
        job = enqueue(prep, settings, on_update=progress.update)

        def close():
            if not job.future.done():
                batcher.cancel(job)

        return Stream(events(job, batcher, progress, lambda texts: finish(task, prep, texts), kind, request.scope.get(DEADLINE_KEY)),
                      on_close=close, on_slow=lambda: metrics.cancelled.labels("slow_reader").inc(),
                      ping=15, send_timeout=limits.read_timeout, headers={"Cache-Control": "no-store"})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        if feedback_log is None:
            raise UserError(403, "feedback logging is off (start osum-serve with --feedback-log FILE)")
        raw = await request.body()  # the guard has bounded it (64 KiB) and checked its Content-Type
        if len(raw) > FEEDBACK_BYTES:
            raise UserError(413, "feedback larger than 64 KiB", reason="body_too_large")
        try:
            record = _strict_json(raw)
        except RecursionError:
            raise UserError(400, f"feedback is nested deeper than {FEEDBACK_DEPTH} levels") from None
        except (ValueError, UnicodeError) as e:
            raise UserError(400, f"feedback is not JSON: {e}") from None
        if _depth(record) > FEEDBACK_DEPTH:
            raise UserError(400, f"feedback is nested deeper than {FEEDBACK_DEPTH} levels")
        if not isinstance(record, dict):
            raise UserError(400, "feedback must be a JSON object")
        unknown = sorted(set(record) - set(FEEDBACK_FIELDS))
        if unknown:
            raise UserError(400, f"unknown feedback fields {[k[:40] for k in unknown[:5]]}; expected "
                                 f"{sorted(FEEDBACK_FIELDS)}")
        for key, kind in FEEDBACK_FIELDS.items():
            if key in record and not isinstance(record[key], kind):
                raise UserError(400, f"feedback field {key!r} must be a {kind.__name__}")
        tags = record.get("tags", {})
        if len(tags) > FEEDBACK_TAGS or not all(isinstance(v, str) for v in tags.values()):
            raise UserError(400, f"feedback 'tags' must map at most {FEEDBACK_TAGS} names to strings")
        if record.get("verdict") not in ("correct", "wrong"):
            raise UserError(400, "feedback verdict must be 'correct' or 'wrong'")
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "model": model.path.name, **record}, ensure_ascii=True, allow_nan=False) + "\n"
        def append():
            with open(feedback_log, "a", encoding="ascii") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

        async with feedback_lock:  # one whole line per record, appended and fsynced (in a thread) before the reply
            try:
                await asyncio.to_thread(append)
            except OSError as e:  # the log went away under the server (checked at start): say so, as JSON
                raise UserError(503, f"feedback not recorded: {e.strerror or 'write failed'}") from None
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok", **batcher.stats, "queued": batcher.queued_windows,
                "queued_requests": len(batcher.jobs), "generating": batcher.generating, "decoding": pool.running,
                "decode_waiting": pool.waiting,
                "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model.path.name, "object": "model", "tasks": sorted(model.prompts),
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "feedback": feedback_log is not None, "max_prompt_tokens": prompt_limit,
            "max_seconds": limits.max_seconds, "max_bytes": limits.max_bytes}]}

    @app.post("/v1/understand")
    async def v1_understand(request: Request, file: UploadFile = File(...), task: str | None = Form(None),
                            prompt: str | None = Form(None), decoding: str = Form("greedy"),
                            max_new_tokens: int | None = Form(None), stream_: bool = Form(False, alias="stream"),
                            segment: str | None = Form(None)):
        if stream_:
            return await stream(request, "understand", file, task, prompt, decoding, max_new_tokens,
                                segment=segment)
        return await understand(file, task, prompt, decoding, max_new_tokens, segment=segment)

    @app.post("/v1/audio/transcriptions")
    async def v1_transcriptions(request: Request, file: UploadFile = File(...),
                                model_name: str | None = Form(None, alias="model"),
                                response_format: str = Form("json"), prompt: str | None = Form(None),
                                language: str | None = Form(None), temperature: float | None = Form(None),
                                stream_: bool = Form(False, alias="stream"), segment: str | None = Form(None),
                                granularities: list[str] = Form([], alias="timestamp_granularities[]")):
        if response_format not in ("json", "text", "srt", "vtt", "verbose_json"):
            raise UserError(400, f"response_format {response_format[:40]!r}: expected json, text, srt, vtt or "
                                 f"verbose_json")
        bad = [g for g in granularities if g not in ("word", "segment")]
        if bad:
            raise UserError(400, f"timestamp_granularities[] {bad[0][:40]!r}: expected word or segment")
        if granularities and response_format != "verbose_json":
            raise UserError(400, "timestamp_granularities[] needs response_format=verbose_json")
        # word timestamps are the model's <ALIGN> task (the package's prompt for "<TRANSCRIBE> <ALIGN>")
        task = "<TRANSCRIBE> <ALIGN>" if "word" in granularities else "<TRANSCRIBE>"
        if stream_:
            if response_format not in ("json", "text"):
                raise UserError(400, f"stream=true answers transcript.text events: response_format must be json "
                                     f"or text, not {response_format}")
            return await stream(request, "transcription", file, task, None, "greedy", None,
                                context=prompt or None, segment=segment)
        # OpenAI's prompt is context for the transcription: it goes before the task's instruction, never instead
        r = await understand(file, task, None, "greedy", None, context=prompt or None, segment=segment)
        text = r.get("transcript", r.get("text", ""))
        if response_format == "json":
            return {"text": text}
        if response_format == "verbose_json":
            return verbose_json(r, r["seconds"], words="word" in granularities, language=language)
        if response_format == "text":
            return PlainTextResponse(text)
        if response_format == "vtt":
            return PlainTextResponse(to_vtt(r["segments"]), media_type="text/vtt")
        return PlainTextResponse(to_srt(r["segments"]), media_type="application/x-subrip")

    return app

