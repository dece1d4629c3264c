"""The server's front door: one ASGI middleware every HTTP request passes before the routes, and the one error
contract (every non-2xx is ``{"error": "<one line>"}``).

Per request, in this order (each refusal is a JSON error with ``Connection: close`` and counted in
``osum_rejected_total{reason}``):

0. **Header size**: more than 16 KiB of headers is a 431 (h11's own limit only sees headers arriving in pieces).
1. **Host** must be an IP literal, ``localhost``, this machine's name, or the host of an ``--allowed-origin``
   (421 otherwise): a DNS-rebinding page's requests carry its own host name and are refused.
2. **Origin**, when a browser sends one, must be the server's own (the request's ``Host``) or an
   ``--allowed-origin`` (403 otherwise): a cross-site page cannot post to the API. Allowed cross-origin pages get
   CORS headers (and their preflight ``OPTIONS`` a 204).
3. **API key**: with ``--api-key``, every endpoint but ``GET /health`` and the page ``GET /`` (static, it asks
   for the key) needs ``Authorization: Bearer KEY`` (401 otherwise; compared in constant time).
4. **Content-Type**: ``application/json`` for JSON endpoints, ``multipart/form-data`` for uploads (415).
5. **Body size**: ``Content-Length`` over the endpoint's limit is refused before a byte is read (413); the body is
   counted as it streams and refused at the limit (413), so nothing larger is ever spooled or held.
6. **Time**: no body byte for ``read_timeout`` seconds is a 408; a request not answered within
   ``request_timeout`` seconds (upload included) is a 504 (408 while the body is still arriving), and its queued
   work is cancelled.
7. **Disconnect**: a client that goes away once its body is in cancels its request (queued windows dropped,
   audio not decoded if it was still waiting for a worker); counted in ``osum_cancelled_total``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_ADDRESS = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")
_HEX = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s/'\"<>:,;()\[\]]+){2,}/?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def one_line(message: Any, limit: int = 500) -> str:
    """A message fit for a client: one line, no object addresses, no file-system paths, at most ``limit``
    characters."""
    s = _CONTROL.sub(" ", str(message))
    s = _ADDRESS.sub("<object>", s)
    s = _HEX.sub("0x…", s)
    s = _PATH.sub("<path>", s)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def error_body(message: Any) -> bytes:
    return json.dumps({"error": one_line(message)}, ensure_ascii=True, separators=(",", ":")).encode("ascii")


async def send_error(send, status: int, message: Any, headers: dict[str, str] | None = None) -> None:
    body = error_body(message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Abort(Exception):
    """Raised into the app from ``receive`` when the body broke a limit; the guard answers instead."""


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lowercased, default ports dropped; ``None`` if it is not an origin."""
    try:
        u = urlsplit(origin.strip())
        port = u.port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.fragment \
            or u.username or u.password:
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    default = {"http": 80, "https": 443}[u.scheme]
    return f"{u.scheme}://{host.lower()}" + (f":{port}" if port and port != default else "")


def _hostname(host: str) -> str:
    """``Host`` header -> host name without port, lowercased (IPv6 literal without brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


MAX_HEADER_BYTES = 16 << 10
DEADLINE_KEY = "osum.deadline"  # the request's deadline (time.perf_counter seconds), set in the ASGI scope
OPEN = frozenset({("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/")})
ENDPOINTS = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/understand", "/v1/audio/transcriptions",
                       "/v1/feedback", "/openapi.json"})


@dataclass(frozen=True)
class Policy:
    """What the guard lets in. ``body_limits``: bytes per path (others get ``default_body``)."""

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    body_limits: dict = field(default_factory=dict)
    default_body: int = 64 << 10
    json_paths: frozenset = frozenset({"/v1/feedback"})
    upload_paths: frozenset = frozenset({"/v1/understand", "/v1/audio/transcriptions"})
    read_timeout: float = 10.0
    request_timeout: float = 300.0

    def allowed_hosts(self) -> frozenset:
        names = {"localhost"}
        try:
            names.add(socket.gethostname().lower())
        except OSError:
            pass
        for o in self.allowed_origins:
            names.add(_hostname(urlsplit(o).netloc))
        return frozenset(names)


class Guard:
    """The ASGI middleware (``app.add_middleware(Guard, policy=..., metrics=...)``)."""

    def __init__(self, app, *, policy: Policy, metrics=None):
        self.app, self.policy, self.metrics = app, policy, metrics
        self.hosts = policy.allowed_hosts()
        self.origins = frozenset(policy.allowed_origins)
        self.key = policy.api_key.encode() if policy.api_key else None

    # -- checks --------------------------------------------------------------------------------------------

    def _origin_ok(self, origin: str, host: str | None) -> tuple[bool, bool]:
        """(allowed, cross-origin)"""
        norm = normalize_origin(origin)
        if norm is None:
            return False, True
        if host is not None and urlsplit(norm).netloc == host.strip().lower():
            return True, False
        return norm in self.origins, True

    def _check(self, method: str, path: str, h: dict[str, str], header_bytes: int = 0):
        """``None`` or ``(status, message, reason, headers)``."""
        if header_bytes > MAX_HEADER_BYTES:  # h11's own limit applies only to headers that arrive in pieces
            return 431, f"request headers larger than {MAX_HEADER_BYTES >> 10} KiB", "headers_too_large", {}
        host = h.get("host")
        if host is not None:
            name = _hostname(host)
            if not (name in self.hosts or _is_ip(name)):
                return 421, f"host {name[:100]!r} is not served here (add it with --allowed-origin)", "bad_host", {}
        origin = h.get("origin")
        if origin is not None and not self._origin_ok(origin, host)[0]:
            return 403, f"origin {origin[:100]!r} is not allowed (--allowed-origin)", "bad_origin", {}
        if method == "OPTIONS":
            return None
        if self.key is not None and (method, path) not in OPEN:
            auth = h.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                     self.key):
                return 401, "missing or wrong API key (send Authorization: Bearer KEY)", "unauthorized", \
                    {"WWW-Authenticate": "Bearer"}
        if method == "POST":
            ctype = h.get("content-type", "").split(";", 1)[0].strip().lower()
            if path in self.policy.json_paths and ctype != "application/json":
                return 415, "send the body as Content-Type: application/json", "unsupported_media_type", {}
            if path in self.policy.upload_paths and ctype != "multipart/form-data":
                return 415, "send a multipart/form-data upload (a 'file' field)", "unsupported_media_type", {}
        length = h.get("content-length")
        limit = self.policy.body_limits.get(path, self.policy.default_body)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return 413, f"request body of {int(length)} bytes > this endpoint's {limit} bytes", "body_too_large", {}
        return None

    # -- the request -------------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        method, path = scope["method"], scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        h: dict[str, str] = {}
        for k, v in scope["headers"]:
            h.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        status = [500]
        cors: list = []
        if "origin" in h:
            ok, cross = self._origin_ok(h["origin"], h.get("host"))
            if ok and cross:
                cors = [(b"access-control-allow-origin", h["origin"].strip().encode("latin-1")), (b"vary", b"Origin")]

        async def send_out(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                if cors:
                    msg = {**msg, "headers": [*msg.get("headers", []), *cors]}
            await send(msg)

        try:
            problem = self._check(method, path, h, sum(len(k) + len(v) + 4 for k, v in scope["headers"]))
            if problem is not None:
                code, message, reason, headers = problem
                self._count("rejected", reason)
                await send_error(send_out, code, message, headers)
                return
            if method == "OPTIONS" and "origin" in h and "access-control-request-method" in h:
                await send_out({"type": "http.response.start", "status": 204, "headers": [
                    (b"access-control-allow-methods", b"GET, POST"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600")]})
                await send_out({"type": "http.response.body", "body": b""})
                return
            limit = self.policy.body_limits.get(path, self.policy.default_body)
            has_body = "transfer-encoding" in h or h.get("content-length", "0").strip() not in ("", "0")
            await self._run(scope, receive, send_out, limit, t0, status, has_body)
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _count(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, kind).labels(reason).inc()

    async def _run(self, scope, receive, send, limit: int, t0: float, status: list, has_body: bool) -> None:
        p = self.policy
        deadline = t0 + p.request_timeout
        scope[DEADLINE_KEY] = deadline  # a streamed answer ends itself, with an error event, just before it
        complete, gone = asyncio.Event(), asyncio.Event()
        state: dict[str, Any] = {"bytes": 0, "error": None, "started": False, "finished": False}

        async def recv():
            if complete.is_set():  # the body is in: only a disconnect can come now (the watcher sees it)
                await gone.wait()
                return {"type": "http.disconnect"}
            wait = min(p.read_timeout, max(0.0, deadline - time.perf_counter()))
            try:
                msg = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                state["error"] = (408, f"no request body data for {wait:.3g} s", "read_timeout")
                raise _Abort from None
            if msg["type"] == "http.request":
                state["bytes"] += len(msg.get("body", b""))
                if state["bytes"] > limit:
                    state["error"] = (413, f"request body larger than this endpoint's {limit} bytes",
                                      "body_too_large")
                    raise _Abort
                if not msg.get("more_body", False):
                    complete.set()
            elif msg["type"] == "http.disconnect":
                gone.set()
            return msg

        async def send_app(msg):
            if state["error"] is not None or gone.is_set():
                return  # the guard answers (or nobody listens)
            if msg["type"] == "http.response.start":
                state["started"] = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                state["finished"] = True
            await send(msg)

        async def watch():
            await complete.wait()
            while not state["finished"]:
                msg = await receive()
                if msg["type"] == "http.disconnect" and not state["finished"]:
                    gone.set()
                    return

        app = asyncio.ensure_future(self.app(scope, recv, send_app))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app, watcher}, timeout=max(0.0, deadline - time.perf_counter()),
                               return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and state["finished"]:  # answered; the app is only returning
                await asyncio.wait({app})
        except BaseException:
            app.cancel()
            watcher.cancel()
            raise
        watcher.cancel()
        if app.done():
            try:
                app.result()
            except _Abort:
                pass
            except Exception:
                if state["error"] is None or state["started"]:
                    raise
            if state["error"] is not None and not state["started"]:
                code, message, reason = state["error"]
                self._count("rejected", reason)
                await send_error(send, code, message)
            elif gone.is_set() and not state["started"]:
                status[0] = 499
                self._count("cancelled", "disconnect")
            return
        app.cancel()
        try:
            await app
        except (asyncio.CancelledError, Exception):
            pass
        if gone.is_set():
            status[0] = 499  # nginx's "client closed request"
            self._count("cancelled", "disconnect")
            return
        if not state["started"]:
            self._count("rejected", "deadline")
            if complete.is_set() or not has_body:
                await send_error(send, 504, f"request not answered within --request-timeout {p.request_timeout:g} s")
            else:
                await send_error(send, 408, f"request body not received within --request-timeout "
                                            f"{p.request_timeout:g} s")
