"""SSE framing for OpenAI streams (sse-starlette underneath).

Every stream ends with ``data: [DONE]``; an error after the first byte (engine death) becomes an
OpenAI error event ``data: {"error": {...}}`` followed by ``data: [DONE]`` -- the official client
raises ``APIError`` on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse as _EventSourceResponse

from sparkserve.server.errors import ApiError, internal_error

logger = logging.getLogger(__name__)

DONE = "[DONE]"


class EventSourceResponse(_EventSourceResponse):
    """sse-starlette's response with ``\\n`` line separators, as OpenAI sends them."""

    def __init__(self, content: AsyncIterator[dict[str, str]], **kwargs: Any) -> None:
        kwargs.setdefault("sep", "\n")
        super().__init__(content, **kwargs)


async def stream_events(payloads: AsyncIterator[str]) -> AsyncIterator[dict[str, str]]:
    """Wrap JSON payloads as SSE events; append an error event on failure, then ``[DONE]``."""
    try:
        async for payload in payloads:
            yield {"data": payload}
    except ApiError as exc:
        yield {"data": json.dumps(exc.to_dict())}
    except Exception as exc:
        logger.exception("stream failed")
        yield {"data": json.dumps(internal_error(exc).to_dict())}
    yield {"data": DONE}
