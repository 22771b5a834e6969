"""What the engine hands the server: output deltas, step statistics and the errors of ``AsyncEngine.add_request``.

Torch-free, so the server (and test fakes) import these without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkserve.scheduler.outputs import TokenLogprob
from sparkserve.scheduler.policy.controller import ControllerStats
from sparkserve.scheduler.stats import DraftOutcome, SchedulerStats


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
        num_cached_tokens: prompt tokens served from the prefix cache.
        speculation: this delta's verify step, the request's row of the step's stats record
            (``SpecDecodingStats.drafts``); None when it verified nothing (prefill, no drafter).
        prompt_logprobs: on the first output, when asked: one entry per prompt token after the first.
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
    num_cached_tokens: int = 0
    speculation: DraftOutcome | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class StepStats:
    """One non-empty engine step: the scheduler's record of it and its wall times.

    Attributes:
        scheduler: what the step did (``sparkserve.scheduler.stats.SchedulerStats``: B, R, preemptions,
            drafting, the speculation counts).
        duration_s: wall time of schedule + execute + update, seconds.
        schedule_s / execute_s / update_s: wall time of the three parts of the step, seconds
            (``ModelRunner.last_timings`` splits execute further).
    """

    scheduler: SchedulerStats
    duration_s: float = 0.0
    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    """What metrics read from the engine after a step (``EngineCore.stats``).

    Attributes:
        num_running / num_waiting: requests running / waiting in the scheduler.
        kv_cache_usage: fraction of KV blocks in use, in [0, 1].
        step: the step this snapshot follows, None when none ran (an empty step, aborts only).
        num_speculative_tokens: gamma of the drafter, 0 without one.
        controller: the speculation controller's snapshot, None without a drafter.
        prefix_cache_queries / prefix_cache_hits: prompt tokens looked up in / found in the prefix
            cache since start-up (cumulative).
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step: StepStats | None = None
    num_speculative_tokens: int = 0
    controller: ControllerStats | None = None
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
