"""Errors the scheduler raises across its contract (pure Python).

The server turns a ``RequestRejectedError`` into an OpenAI-style HTTP 400 before any SSE byte is
sent, so its fields mirror the OpenAI error object (``message``, ``param``, ``code``).
"""

from __future__ import annotations


class RequestRejectedError(ValueError):
    """A request that can never be served with this configuration.

    Raised by ``Scheduler.add_request`` instead of queueing the request forever: its
    ``prompt + max_tokens`` exceeds ``max_model_len``, or the KV blocks it needs at full length exceed
    the blocks that exist, or it is malformed (empty prompt, duplicate id).

    Attributes:
        message: human-readable reason (safe to show to the client).
        param: the request field at fault (``"prompt"``, ``"max_tokens"``, ...), or None.
        code: machine-readable reason, e.g. ``"context_length_exceeded"``.
    """

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BlockAccountingError(AssertionError):
    """The KV block allocator's bookkeeping is inconsistent (a bug, never a load condition).

    Subclasses ``AssertionError`` so tests and debug checks treat it as a failed invariant, but it is
    raised explicitly, so it still fires under ``python -O``.
    """
