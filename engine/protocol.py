"""What the engine hands the server: output deltas and the errors of ``AsyncEngine.add_request``.

Torch-free, so the server (and test fakes) import these without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.outputs import TokenLogprob


class EngineDeadError(RuntimeError):
    """The engine loop died; in-flight requests fail and readiness turns false."""


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full (HTTP 429 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDrainingError(RuntimeError):
    """The engine stopped admitting requests (graceful shutdown; HTTP 503)."""


@dataclass(frozen=True)
class RequestOutput:
    """A delta of one request's output.

    Attributes:
        request_id: the request.
        new_token_ids: tokens new since the previous output (several with speculation).
        new_logprobs: one entry per new token when logprobs were requested.
        finish_reason: "stop" | "length" | "abort" | "error" on the last output, else None.
        stop_reason: the stop token id that ended the request, if any.
        num_prompt_tokens: prompt length.
        num_output_tokens: generated tokens so far (cumulative).
        arrival_time: ``time.monotonic()`` when the engine accepted the request.
        first_scheduled_time: ``time.monotonic()`` when it first ran (None if unknown).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
