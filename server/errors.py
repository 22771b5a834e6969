"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server knows about becomes an :class:`ApiError` before any SSE byte is sent; the
exception handlers installed by :func:`install_error_handlers` turn it (and FastAPI's own
validation / HTTP errors) into the JSON body OpenAI clients expect.

Engine exceptions are recognised by class name across the MRO (:func:`engine_error_to_api_error`)
so that the server never imports ``sparkserve.engine.async_engine`` (which pulls in torch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparkserve.engine.outputs import EngineDeadError, EngineDrainingError, QueueFullError
from sparkserve.scheduler.errors import RequestRejectedError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """A request failure with its HTTP status and OpenAI error fields.

    Attributes:
        status: HTTP status code.
        message: human-readable explanation.
        type: OpenAI error type (defaults from the status, e.g. ``invalid_request_error`` for 400).
        param: the request field at fault, if any (``"messages"``, ``"max_tokens"``, ...).
        code: machine-readable code (``"model_not_found"``, ``"context_length_exceeded"``, ...).
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body (also used as an SSE error event mid-stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


def is_engine_dead(exc: BaseException) -> bool:
    """True for the engine's ``EngineDeadError`` (or a subclass)."""
    return isinstance(exc, EngineDeadError)


def engine_error_to_api_error(exc: BaseException) -> ApiError | None:
    """Map an exception raised by ``AsyncEngine.add_request`` (or mid-generation) to an ApiError.

    ``RequestRejectedError`` -> 400 (the request can never fit), ``QueueFullError`` -> 429 with
    ``Retry-After`` (whole seconds, rounded up, at least 1), ``EngineDrainingError`` and
    ``EngineDeadError`` -> 503. Returns
    None for anything else, which the caller treats as a 500.
    """
    if isinstance(exc, RequestRejectedError):
        return ApiError(
            400,
            exc.message or str(exc),
            param=exc.param,
            code=exc.code,
        )
    if isinstance(exc, QueueFullError):
        retry_after = max(1, math.ceil(exc.retry_after_s))
        return ApiError(
            429,
            str(exc) or "The server is overloaded: the waiting queue is full. Retry later.",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, EngineDrainingError):
        return ApiError(503, "The server is shutting down and does not accept new requests.", code="draining")
    if is_engine_dead(exc):
        return ApiError(503, f"The inference engine is not running: {exc}", code="engine_dead")
    return None


def internal_error(exc: BaseException) -> ApiError:
    """A 500 for an unexpected exception (message only, no traceback)."""
    return ApiError(500, f"Internal server error: {type(exc).__name__}: {exc}")


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) of one pydantic error; ``param`` is the dotted field path without "body"."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    # Union members show up as loc parts such as "str" / "list[int]"; keep only field names.
    fields = [
        part for part in loc if not any(ch in part for ch in "[]") and part not in ("str", "int", "float")
    ]
    param = ".".join(fields) or None
    if error.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if error.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    msg = str(error.get("msg", "Invalid request"))
    msg = msg.removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {msg}" if param else msg), param


def rejection_reason(status: int, code: str | int | None = None) -> str | None:
    """The ``request_rejected_total`` reason of an error answered before admission, else None:
    400 / 408 / 413 -> invalid_request, 401 -> unauthorized, 429 -> queue_full, 503 ``draining`` ->
    draining."""
    if status in (400, 408, 413):
        return "invalid_request"
    if status == 401:
        return "unauthorized"
    if status == 429:
        return "queue_full"
    if status == 503 and code == "draining":
        return "draining"
    return None


RejectionCallback = Callable[[str], None]


def _notify(on_rejected: RejectionCallback | None, status: int, code: str | int | None) -> None:
    reason = rejection_reason(status, code)
    if on_rejected is not None and reason is not None:
        on_rejected(reason)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    try:
        json.loads(await request.body())
    except ValueError as decode_error:  # FastAPI reports some malformed bodies as type errors
        message = f"We could not parse the JSON body of your request: {decode_error}"
        return ApiError(400, message, code="invalid_json").to_response()
    errors = list(exc.errors())
    message, param = _validation_message(errors[0]) if errors else ("Invalid request", None)
    return ApiError(400, message, param=param).to_response()


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.to_response()


async def _on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).to_response()


def install_error_handlers(app: FastAPI, on_rejected: RejectionCallback | None = None) -> None:
    """Make every error the app returns OpenAI-shaped (validation -> 400, HTTP errors, ApiError).

    ``on_rejected(reason)`` is called for each error that :func:`rejection_reason` classifies as a
    rejection (the ``request_rejected_total`` metric).
    """

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        response = await _on_validation_error(request, exc)
        _notify(on_rejected, response.status_code, None)
        return response

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        _notify(on_rejected, exc.status, exc.code)
        return await _on_api_error(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        response = await _on_http_error(request, exc)
        _notify(on_rejected, response.status_code, None)
        return response

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)


async def _on_unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug surfaced as an OpenAI-shaped 500 instead of Starlette's plain-text one (the traceback is
    still logged by Starlette's error middleware; the client gets the exception type only)."""
    return ApiError(500, f"Internal server error ({type(exc).__name__}).", code="internal_error").to_response()
