"""What the engine hands the server: output deltas and the errors of ``AsyncEngine.add_request``.

Torch-free, so the server (and test fakes) import these without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparkserve.scheduler.outputs import TokenLogprob
from sparkserve.scheduler.policy.controller import ControllerStats


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
        num_draft_tokens / num_accepted_tokens: drafts verified / accepted in this delta's steps.
        drafter: the drafter family of those drafts ("" without drafts).
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
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafter: str = ""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class StepStats:
    """What one step did (for metrics and the throughput profile).

    Attributes:
        num_batched_tokens: tokens fed to the target.
        num_decode_requests: requests that sampled this step.
        duration_s: wall time of schedule + execute + update, seconds.
        num_preemptions: requests preempted by this step's schedule.
        verified_per_request / accepted_per_request: l_r and accepted drafts of each decode request
            (drafter loaded only; nothing past a stop is counted).
        num_drafting: requests the runner drafted for after this step (the drafting gate's choice).
        schedule_s / execute_s / update_s: wall time of the three parts of the step, seconds
            (``ModelRunner.last_timings`` splits execute further).
    """

    num_batched_tokens: int = 0
    num_decode_requests: int = 0
    duration_s: float = 0.0
    num_drafting: int = 0
    num_preemptions: int = 0
    verified_per_request: list[int] = field(default_factory=list)
    accepted_per_request: list[int] = field(default_factory=list)
    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0


@dataclass
class SpecStats:
    """Speculative decoding counters (DeepSpec section 3 definitions).

    Attributes:
        num_drafts: verify steps of requests with a drafter (steps with l_r = 0 included).
        num_draft_tokens: drafts verified (sum of l_r).
        num_accepted_tokens: drafts accepted (never past a stop).
        verified_per_pos[k] / accepted_per_pos[k]: drafts verified / accepted at position k;
            accepted/verified at k is unbiased even when l_r varies.
    """

    gamma: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    verified_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.verified_per_pos = [0] * self.gamma
        self.accepted_per_pos = [0] * self.gamma

    def record(self, num_draft_tokens: int, num_accepted: int, emitted: bool) -> None:
        if not self.gamma or not emitted:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for k in range(num_draft_tokens):
            self.verified_per_pos[k] += 1
        for k in range(num_accepted):
            self.accepted_per_pos[k] += 1

    @property
    def accepted_length(self) -> float:
        """tau: tokens emitted per verify step, bonus / recovered token included."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass(frozen=True)
class EngineStats:
    """What metrics read from the engine after a step (``EngineCore.stats``).

    Attributes:
        num_running / num_waiting: requests running / waiting in the scheduler.
        kv_cache_usage: fraction of KV blocks in use, in [0, 1].
        last_step: the latest non-empty step (the same object until another step runs).
        num_speculative_tokens: gamma of the drafter, 0 without one.
        controller: the speculation controller's snapshot, None without a drafter.
        prefix_cache_queries / prefix_cache_hits: prompt tokens looked up in / found in the prefix
            cache since start-up (cumulative).
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    last_step: StepStats
    num_speculative_tokens: int = 0
    controller: ControllerStats | None = None
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
