"""HTTP-level protection in front of the routes: body size and read time, ambiguous credentials,
and a header read timeout for new connections.

:class:`RequestLimitsMiddleware` is pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses
and disconnect notices pass through untouched. For every HTTP request it

* answers 400 when the request carries more than one ``Authorization`` header (which one "wins"
  differs between proxies and servers; refusing is the only unambiguous answer);
* answers 413 at once when ``Content-Length`` exceeds ``max_body_bytes``, without reading the body;
* otherwise reads the body itself, counting bytes as they arrive (a chunked body has no
  ``Content-Length``): past ``max_body_bytes`` it answers 413 and stops reading, so a 50 MB body costs
  at most the limit in memory and never reaches JSON parsing; a body that has not fully arrived
  ``body_timeout_s`` seconds after the request started is answered 408 (slow-body clients cannot
  hold a request open);
* then calls the app with the buffered body replayed, and later ``receive`` calls (disconnect
  notices) passed through.

Headers are parsed by uvicorn before any ASGI code runs, so their read timeout lives in the
protocol: :class:`HeaderTimeoutH11Protocol` closes a connection whose request head is not complete
``timeout_keep_alive`` seconds after the connection opened (or after the previous response). Header
size is bounded by h11 (``h11_max_incomplete_event_size``, 16 KiB). Behind a reverse proxy, set its
own header / body timeouts too (nginx ``client_header_timeout`` / ``client_body_timeout``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sparkserve.server.errors import ApiError, RejectionCallback

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


def num_authorization_headers(scope: Scope) -> int:
    """How many ``Authorization`` headers the request carries (ASGI header names are lower-case)."""
    return sum(1 for name, _ in scope.get("headers", ()) if name == b"authorization")


def duplicate_authorization_error() -> ApiError:
    """The 400 for a request with several ``Authorization`` headers."""
    return ApiError(
        400, "The request has more than one Authorization header; send exactly one.",
        param="Authorization", code="duplicate_authorization_header",
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 rejects malformed lengths before we get here
    return None


class RequestLimitsMiddleware:
    """Body size limit, body read timeout and duplicate-``Authorization`` check (module docstring).

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: largest accepted request body (default 16 MiB: tool schemas fit easily).
        body_timeout_s: seconds, from the start of the request, for the whole body to arrive.
        on_rejected: called with the ``request_rejected_total`` reason of each 400 / 413 / 408.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        on_rejected: RejectionCallback | None = None,
    ) -> None:
        if max_body_bytes < 1 or body_timeout_s <= 0:
            raise ValueError("max_body_bytes must be >= 1 and body_timeout_s > 0")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self._on_rejected = on_rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if num_authorization_headers(scope) > 1:
            await self._reject(duplicate_authorization_error(), scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await self._reject(self._too_large(), scope, receive, send)
            return
        body = await self._read_body(receive)
        if isinstance(body, ApiError):
            await self._reject(body, scope, receive, send)
            return
        if body is None:  # the client went away while sending
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | ApiError | None:
        """The whole body, an ApiError (413 / 408), or None if the client disconnected."""
        deadline = time.monotonic() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return ApiError(
                    408, f"The request body did not arrive within {self.body_timeout_s:g} s.",
                    code="request_timeout",
                )
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )

    async def _reject(self, error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        if self._on_rejected is not None:
            self._on_rejected("invalid_request")
        response = error.to_response()
        response.headers["Connection"] = "close"  # the unread rest of the body must not be parsed
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that returns ``body`` once, then whatever the server sends (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header read timeout (module docstring).

    Pass as ``uvicorn.Config(http=HeaderTimeoutH11Protocol)``; the timeout is the config's
    ``timeout_keep_alive``. A timer is armed when a connection is made and after each response; it
    is cancelled once h11 has parsed a complete request head, and closes the connection when it fires
    first (uvicorn's own keep-alive timer is cancelled by any byte, so a client trickling header bytes
    would hold the connection forever).
    """

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._header_timer.cancel()  # the request head is complete
            self._header_timer = None

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # for the next request on this connection
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.timeout_keep_alive, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.timeout_keep_alive_handler()  # closes the connection
