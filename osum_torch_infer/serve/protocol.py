"""uvicorn's h11 protocol with two additions, passed to uvicorn as ``http=`` (its documented protocol-class
option): a **header timeout** and **JSON answers** for the few responses uvicorn writes itself.

* uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but it arms no timer on a fresh
  connection, and any byte cancels the keep-alive timer: a client that connects and sends nothing, or trickles
  its headers, holds the connection forever. Here the request line and headers must be complete within
  ``header_timeout`` seconds of the connection (or of the previous response): otherwise 408 (if some bytes came)
  and the connection is closed.
* uvicorn's ``limit_concurrency`` check (a new request when that many connections or requests are open) is kept
  exactly, but answered ``503 {"error": ...}`` with ``Retry-After: 1`` instead of uvicorn's plain text; a
  malformed request or one whose headers pass the h11 size limit gets ``400 {"error": ...}``.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import error_body


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = error_body(message)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode("latin-1") + body


async def _busy(scope, receive, send) -> None:
    body = error_body("server busy: too many open connections (--max-connections); retry shortly")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def protocol_class(header_timeout: float) -> type:
    """The protocol class for ``uvicorn.Config(http=...)``."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # uvicorn's limit_concurrency check, answered in JSON: the same rule, applied in handle_events
            self._limit, self.limit_concurrency = self.limit_concurrency, None
            self._app = self.app
            self._header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a request came: say why the connection closes
                self.transport.write(_raw_response(408, "Request Timeout",
                                                   f"request headers not received within {header_timeout:g} s"))
            self.transport.close()

        def handle_events(self) -> None:
            limit = self._limit
            busy = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
            self.app = _busy if busy else self._app
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_response(400, "Bad Request", "invalid HTTP request (malformed, or headers "
                                                                   "over the size limit)"))
            self.transport.close()

    return GuardedH11Protocol
