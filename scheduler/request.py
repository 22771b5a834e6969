"""Request state machine (after vLLM v1): ``num_computed_tokens`` chases ``num_tokens``."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from sparkserve.scheduler.outputs import DraftProposal
from sparkserve.scheduler.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered request states; every state >= FINISHED_STOPPED is final.

    Changed only by the scheduler.
    """

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI ``finish_reason`` of a final state, None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class DraftState:
    """A request's speculation state, one value (replaced, never mutated; written only by the scheduler).

    Attributes:
        token_ids: drafted tokens proposed for the next verify step (not yet accepted).
        confidences: per-position conditional survival confidences c_k of those drafts (fp32 values as
            Python floats), same length as ``token_ids``; empty for drafters without a confidence head.
        draft_id: the runner's id of those drafts (where their q lives); None without drafts.
        drafter: the drafter family that proposed them (per-drafter calibration and statistics).
        last_confidences: the confidences of the latest proposal with confidences (kept after it is
            verified or when the request is not drafted for): the estimate of what drafting for it would
            be worth; empty before its first drafts.
        last_num_tokens: the request's ``num_tokens`` when that proposal arrived (its age = now - this).
        last_drafter: the drafter family of that proposal.
    """

    token_ids: tuple[int, ...] = ()
    confidences: tuple[float, ...] = ()
    draft_id: int | None = None
    drafter: str = ""
    last_confidences: tuple[float, ...] = ()
    last_num_tokens: int = 0
    last_drafter: str = ""

    def proposed(self, proposal: DraftProposal | None, num_tokens: int) -> DraftState:
        """The state after the runner's proposal for the next step (None: no drafts); a proposal with
        confidences becomes the latest estimate, stamped with the request's ``num_tokens``."""
        if proposal is None:
            return self.cleared()
        pending = dict(token_ids=tuple(proposal.token_ids), confidences=tuple(proposal.confidences),
                       draft_id=proposal.draft_id, drafter=proposal.drafter)
        if not proposal.confidences:
            return DraftState(**pending, last_confidences=self.last_confidences,
                              last_num_tokens=self.last_num_tokens, last_drafter=self.last_drafter)
        return DraftState(**pending, last_confidences=tuple(proposal.confidences), last_num_tokens=num_tokens,
                          last_drafter=proposal.drafter)

    def cleared(self) -> DraftState:
        """No pending drafts (verified, preempted or finished); the latest estimate is kept."""
        return DraftState(last_confidences=self.last_confidences, last_num_tokens=self.last_num_tokens,
                          last_drafter=self.last_drafter)


@dataclass(eq=False)
class Request:
    """One sequence being generated (compared by identity: queues remove it in O(position)).

    Attributes:
        request_id: unique id.
        prompt_token_ids: prompt tokens.
        sampling_params: sampling and stop parameters.
        eos_token_id: the model's EOS token (``None`` if it has none).
        arrival_time: ``time.monotonic()`` seconds at arrival.
        output_token_ids: generated tokens so far (accepted drafts, recovered and bonus tokens).
        num_computed_tokens: tokens whose KV is in the cache. Progress = this chasing
            ``num_tokens`` (prefill, chunked prefill and speculation are all cases of it).
        drafts: its speculation state (``DraftState``): pending drafts, their id and drafter, and the
            latest proposal's confidences.
        num_preemptions: how many times the request was preempted (recompute).
        stop_reason: the stop token id that finished it (None for EOS or a length finish).
        first_scheduled_time: ``time.monotonic()`` when it first ran (queue time = this - arrival).
        block_keys: prefix-cache keys of its full blocks so far (``sparkserve.scheduler.block_manager.block_keys``).
        num_cached_tokens: prompt tokens its first admission found in the prefix cache (usage).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    drafts: DraftState = field(default_factory=DraftState)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    block_keys: list = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + generated (drafts excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def clear_drafts(self) -> None:
        """Drop the pending drafts (verified, preempted or finished)."""
        self.drafts = self.drafts.cleared()
