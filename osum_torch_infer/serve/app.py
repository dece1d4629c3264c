"""The HTTP API (FastAPI): ``POST /v1/understand``, the OpenAI-compatible ``POST /v1/audio/transcriptions``,
``GET /health``, ``GET /v1/models``, ``POST /v1/feedback``, and the web page at ``GET /`` (``static/index.html``).
User mistakes are 4xx with a one-line JSON ``{"error": ...}``, never a 500; a full queue is 503 with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from ..features import MAX_SECONDS, SAMPLE_RATE, AudioError, load_audio, log_mel_spectrogram, split_windows, wav_truncation
from ..parsing import join_windows, normalize_task
from .batcher import Batcher, QueueFull

DECODINGS = ("greedy", "beam", "osum")
PAGE = Path(__file__).with_name("static") / "index.html"
FEEDBACK_FIELDS = {"verdict": str, "audio": str, "task": str, "prompt": str, "decoding": str, "result": str,
                   "transcript": str, "tags": dict, "comment": str}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 25 << 20  # upload size
    max_seconds: float = 600.0  # audio duration (longer audio is split into 30 s windows below this)
    max_new_tokens: int = 1024


class UserError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def create_app(model, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
               limits: Limits = Limits(), feedback_log: str | os.PathLike | None = None) -> FastAPI:
    """The app over a loaded package. ``feedback_log``: JSONL file the page's correct/wrong buttons append to
    (``None``: feedback is refused with 403)."""
    batcher = Batcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    feedback_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="osum-serve", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    async def read_audio(file: UploadFile):
        data = await file.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise UserError(413, f"upload larger than {limits.max_bytes} bytes")
        if not data:
            raise UserError(400, f"{file.filename}: empty upload")
        cut = wav_truncation(data)
        if cut is not None:
            raise UserError(400, f"{file.filename}: truncated WAV (header {cut[0]:.2f} s, file {cut[1]:.2f} s)")
        try:
            wave = load_audio(data)
        except AudioError as e:
            raise UserError(400, f"{file.filename}: {e}") from None
        except Exception as e:  # a decoder that fails otherwise on garbage is still the user's input
            raise UserError(400, f"{file.filename}: cannot decode audio ({type(e).__name__})") from None
        seconds = len(wave) / SAMPLE_RATE
        if seconds > limits.max_seconds:
            raise UserError(413, f"{file.filename}: {seconds:.1f} s of audio > the server's {limits.max_seconds:g} s")
        return wave

    async def understand(wave, task: str | None, prompt: str | None, decoding: str, max_new_tokens: int | None):
        if decoding not in DECODINGS:
            raise UserError(400, f"decoding {decoding!r}: expected one of {list(DECODINGS)}")
        if max_new_tokens is not None and not 1 <= max_new_tokens <= limits.max_new_tokens:
            raise UserError(400, f"max_new_tokens must lie in [1, {limits.max_new_tokens}]")
        task = normalize_task(task)
        if not prompt:
            try:
                prompt = model.prompt_for(task)
            except ValueError as e:
                raise UserError(400, str(e)) from None
        ids = model.encode_text(prompt)
        try:
            windows = [(off, log_mel_spectrogram(w, model.config.encoder.num_mel_bins))
                       for off, w in split_windows(wave, MAX_SECONDS, SAMPLE_RATE)]
        except AudioError as e:
            raise UserError(400, str(e)) from None
        settings: dict[str, Any] = {"decoding": decoding}
        if max_new_tokens is not None:
            settings["max_new_tokens"] = int(max_new_tokens)
        try:
            texts = await batcher.submit([(f, ids) for _, f in windows], settings)
        except QueueFull as e:
            raise UserError(503, f"server busy: {e}", headers={"Retry-After": "1"}) from None
        result = join_windows([(off, t) for (off, _), t in zip(windows, texts)], task)
        return {**result, "task": task, "prompt": prompt, "windows": len(windows),
                "window_offsets": [off for off, _ in windows], "window_texts": texts,
                "seconds": len(wave) / SAMPLE_RATE}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        if feedback_log is None:
            raise UserError(403, "feedback logging is off (start osum-serve with --feedback-log FILE)")
        raw = await request.body()
        if len(raw) > 65536:
            raise UserError(413, "feedback larger than 64 KiB")
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(400, f"feedback is not JSON: {e}") from None
        if not isinstance(record, dict):
            raise UserError(400, "feedback must be a JSON object")
        unknown = sorted(set(record) - set(FEEDBACK_FIELDS))
        if unknown:
            raise UserError(400, f"unknown feedback fields {unknown}; expected {sorted(FEEDBACK_FIELDS)}")
        for key, kind in FEEDBACK_FIELDS.items():
            if key in record and not isinstance(record[key], kind):
                raise UserError(400, f"feedback field {key!r} must be a {kind.__name__}")
        if record.get("verdict") not in ("correct", "wrong"):
            raise UserError(400, "feedback verdict must be 'correct' or 'wrong'")
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "model": model.path.name, **record}, ensure_ascii=False) + "\n"
        async with feedback_lock:  # one whole line per record, appended and flushed before the reply
            try:
                with open(feedback_log, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # the log went away under the server (checked at start): say so, as JSON
                raise UserError(503, f"feedback not recorded: {e.strerror or e}") from None
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok", **batcher.stats, "queued": len(batcher.pending), "pid": os.getpid()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model.path.name, "object": "model", "tasks": sorted(model.prompts),
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")}]}

    @app.post("/v1/understand")
    async def v1_understand(file: UploadFile = File(...), task: str | None = Form(None),
                            prompt: str | None = Form(None), decoding: str = Form("greedy"),
                            max_new_tokens: int | None = Form(None)):
        return await understand(await read_audio(file), task, prompt, decoding, max_new_tokens)

    @app.post("/v1/audio/transcriptions")
    async def v1_transcriptions(file: UploadFile = File(...), model_name: str | None = Form(None, alias="model"),
                                response_format: str = Form("json"), prompt: str | None = Form(None),
                                language: str | None = Form(None), temperature: float | None = Form(None)):
        if response_format not in ("json", "text", "srt", "vtt", "verbose_json"):
            raise UserError(400, f"response_format {response_format!r}: expected json, text, srt, vtt or verbose_json")
        r = await understand(await read_audio(file), "<TRANSCRIBE>", prompt, "greedy", None)
        text = r.get("transcript", r.get("text", ""))
        if response_format == "json":
            return {"text": text}
        if response_format == "verbose_json":
            return {"text": text, "duration": r["seconds"], "segments": _segments(r)}
        if response_format == "text":
            return PlainTextResponse(text)
        return PlainTextResponse(_subtitles(_segments(r), response_format),
                                 media_type="text/vtt" if response_format == "vtt" else "application/x-subrip")

    return app


def _segments(r: dict) -> list[dict]:
    """One cue per decoded window: [offset, next offset or the end]."""
    offs = r["window_offsets"] + [r["seconds"]]
    return [{"id": i, "start": offs[i], "end": offs[i + 1], "text": t.strip()}
            for i, t in enumerate(r["window_texts"])]


def _stamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _subtitles(segments: list[dict], fmt: str) -> str:
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_stamp(s['start'], '.')} --> {_stamp(s['end'], '.')}\n{s['text']}\n\n"
                                      for s in segments)
    return "".join(f"{s['id'] + 1}\n{_stamp(s['start'], ',')} --> {_stamp(s['end'], ',')}\n{s['text']}\n\n"
                   for s in segments)
