"""The FastAPI application: OpenAI routes, health / readiness probes, auth, graceful drain.

``build_app(engine)`` wires an engine (``sparkserve.engine.async_engine.AsyncEngine`` or a test fake) into an
ASGI app; the lifespan starts and shuts down the engine. The server never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Body, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sparkserve.server.engine_client import EngineClient
from sparkserve.server.errors import ApiError, RejectionCallback, install_error_handlers
from sparkserve.server.http_guard import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    RequestLimitsMiddleware,
    duplicate_authorization_error,
    num_authorization_headers,
)
from sparkserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from sparkserve.server.protocol_responses import ResponsesRequest
from sparkserve.server.router_compat import install_router_routes
from sparkserve.server.serving import RequestMetrics, ServerState
from sparkserve.server.serving_chat import create_chat_completion
from sparkserve.server.serving_completions import create_completion
from sparkserve.server.serving_responses import create_response
from sparkserve.server.serving_tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeResponse,
    TokenizerInfoResponse,
    detokenize,
    parse_tokenize_request,
    tokenize,
    tokenizer_info,
)

logger = logging.getLogger(__name__)


class MetricsRenderer(Protocol):
    """The metrics hook: ``render()`` returns the exposition body and its content type."""

    def render(self) -> tuple[bytes, str]: ...


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <api_key>`` on ``/v1`` routes (401 otherwise).

    A pure ASGI middleware (not ``BaseHTTPMiddleware``) so streaming and disconnects pass through
    untouched, and so auth is checked before the body is read. The key is compared in constant time
    (``secrets.compare_digest``); a request with several ``Authorization`` headers is a 400 (which one
    would count is ambiguous). ``on_rejected("unauthorized")`` is called for each 401 (metrics).
    """

    def __init__(self, app: ASGIApp, api_key: str, on_rejected: RejectionCallback | None = None) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._on_rejected = on_rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if num_authorization_headers(scope) > 1:
                if self._on_rejected is not None:
                    self._on_rejected("invalid_request")
                await duplicate_authorization_error().to_response()(scope, receive, send)
                return
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                error = ApiError(
                    401,
                    "Invalid or missing API key (expected 'Authorization: Bearer <key>').",
                    code="invalid_api_key",
                )
                if self._on_rejected is not None:
                    self._on_rejected("unauthorized")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class ReadinessProbe:
    """Readiness = a real one-token generation through the engine queue, time-limited.

    The result is cached for ``cache_s`` seconds and concurrent probes share one check, so probes
    cannot flood the engine. Draining or a dead engine answer "not ready" without a generation.
    """

    state: ServerState
    timeout_s: float = 10.0
    cache_s: float = 5.0
    _last_result: bool = False
    _last_time: float = float("-inf")
    _lock: asyncio.Lock | None = None

    async def check(self) -> bool:
        engine = self.state.engine
        if self.state.draining or not engine.is_healthy:
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._last_time < self.cache_s:
                return self._last_result
            try:
                ready = await asyncio.wait_for(engine.check_ready(self.timeout_s), self.timeout_s)
            except Exception as exc:  # timeout, engine dead, queue full: all mean "not ready"
                logger.warning("readiness check failed: %r", exc)
                ready = False
            self._last_result, self._last_time = bool(ready), time.monotonic()
            return self._last_result


def _request_metrics(metrics: object) -> RequestMetrics | None:
    """``metrics`` if it takes request events (see :class:`sparkserve.server.serving.RequestMetrics`), else None."""
    return metrics if isinstance(metrics, RequestMetrics) else None


async def drain(state: ServerState, timeout_s: float) -> bool:
    """Graceful shutdown: stop admitting (503, readiness false), wait for in-flight requests to
    finish, and end the ones still running before ``timeout_s`` is up.

    In-flight requests get ``timeout_s - grace`` seconds to finish (grace = 20% of the timeout, at
    most 2 s); the rest are then aborted in the engine and end cleanly within the grace: a stream
    sends its last chunk with ``finish_reason: "abort"`` (and its usage chunk when asked), then
    ``data: [DONE]``; a non-streaming request answers with what it has, ``finish_reason: "abort"``.
    Returns True if every request finished before the abort.
    """
    state.draining = True
    state.engine.stop_admitting()
    grace = min(2.0, 0.2 * timeout_s)
    wait = timeout_s - grace
    deadline = time.monotonic() + wait
    try:
        await asyncio.wait_for(state.engine.drain(wait), wait)
    except Exception as exc:
        logger.warning("engine drain did not complete: %r", exc)
    while state.num_inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.num_inflight == 0:
        return True
    logger.warning("drain timeout: aborting %d in-flight requests", state.num_inflight)
    await state.abort_all()
    deadline = time.monotonic() + grace
    while state.num_inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return False


def build_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    default_max_tokens: int = 1024,
    max_choices: int = 16,
    max_total_tokens: int = 65536,
    metrics: MetricsRenderer | None = None,
    ready_timeout_s: float = 10.0,
    ready_cache_s: float = 5.0,
    manage_engine: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    cors_origins: Sequence[str] = (),
    strict_openai_fields: bool = False,
) -> FastAPI:
    """Build the OpenAI-compatible app around ``engine``.

    Args:
        engine: the engine (see :class:`sparkserve.server.engine_client.EngineClient`).
        api_key: if set, ``/v1`` routes require ``Authorization: Bearer <api_key>``.
        served_model_name: model name for ``/v1/models`` and requests (default: ``engine.model_name``).
        default_max_tokens: ``max_tokens`` when omitted, capped by the context room left.
        max_choices: most choices per request (``n`` times the number of prompts).
        max_total_tokens: most tokens one request may ask for in all (``n`` x ``max_tokens``, summed
            over prompts).
        metrics: optional Prometheus hook served at ``GET /metrics``; if it also has the
            :class:`sparkserve.server.serving.RequestMetrics` methods (``ServerMetrics`` does), requests and
            rejections are recorded into it.
        ready_timeout_s / ready_cache_s: readiness generation time limit and cache lifetime (s).
        manage_engine: start the engine on app start-up and shut it down on app shutdown.
        max_body_bytes / body_timeout_s: request body limit (413 past it) and the seconds the whole
            body may take to arrive (408 after); see :mod:`sparkserve.server.http_guard`.
        cors_origins: origins allowed by CORS; empty (the default) = no CORS headers at all.
        strict_openai_fields: 400 for the OpenAI fields this server ignores (default: a log warning).

    The :class:`ServerState` is at ``app.state.server`` (the CLI drains through it).
    """
    request_metrics = _request_metrics(metrics)
    state = ServerState(
        engine,
        served_model_name or engine.model_name,
        default_max_tokens,
        max_choices,
        max_total_tokens=max_total_tokens,
        metrics=request_metrics,
        strict_openai_fields=strict_openai_fields,
    )
    on_rejected = request_metrics.on_request_rejected if request_metrics is not None else None
    probe = ReadinessProbe(state, ready_timeout_s, ready_cache_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="sparkserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app, on_rejected)
    # The last middleware added runs first: CORS (when configured: preflights carry no key), the API
    # key (headers only, so an unauthenticated body is never read), then the body limits.
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                       on_rejected=on_rejected)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, on_rejected=on_rejected)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await create_chat_completion(body, raw_request, state)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        return await create_completion(body, raw_request, state)

    @app.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest, raw_request: Request) -> Response:
        return await create_response(body, raw_request, state)

    @app.post("/tokenize")
    async def tokenize_route(body: dict[str, Any] = Body(...)) -> TokenizeResponse:  # noqa: B008 (FastAPI)
        return await tokenize(parse_tokenize_request(body), state)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> TokenizerInfoResponse:
        return tokenizer_info(state)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return await detokenize(body, state)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=state.served_model_name, created=created, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = engine.is_healthy
        return JSONResponse(
            {"status": "ok" if healthy else "engine dead"}, status_code=200 if healthy else 503
        )

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = await probe.check()
        status = "ready" if ok else ("draining" if state.draining else "not ready")
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    install_router_routes(app, state)  # /get_load, .../render: what vllm-router calls on a worker

    if metrics is not None:

        @app.get("/metrics")
        async def metrics_route() -> Response:
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

    return app
