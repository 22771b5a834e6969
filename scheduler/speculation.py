"""The scheduler's speculation collaborator: what it asks and tells about drafts, as one Protocol.

The scheduler receives it through its constructor (``Scheduler(config, speculation)``; ``None`` without
speculation) and is its only caller, so speculation's feedback has one owner: the collaborator
(``sparkserve.scheduler.policy.controller.SpeculationController`` when serving). Each step the
scheduler asks ``verify_lengths`` (how many drafts each decode request verifies) and
``select_drafting`` (who drafts after the step); after the runner's result it tells ``on_verified``
(every verify step with drafts: the stated confidences and how many drafts survived) and, for every
request that ends (stop, length, abort, error), ``on_finished``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sparkserve.scheduler.request import Request


@dataclass(frozen=True)
class VerifyContext:
    """What the speculation collaborator knows about the step being planned.

    Attributes:
        num_scheduled_tokens: tokens already in the step (every decode base token + prefill chunks).
        num_decode_requests: running decode requests this step (with or without drafts).
        token_budget: the step's whole token budget (``max_num_batched_tokens``).
    """

    num_scheduled_tokens: int
    num_decode_requests: int
    token_budget: int


class Speculation(Protocol):
    """The scheduler's speculation collaborator (module docstring)."""

    def verify_lengths(self, requests: Sequence[Request], budget_left: int, context: VerifyContext) -> Sequence[int]:
        """l_r per decode request with drafts (FCFS order), given the token budget left after every base
        token and prefill chunk; the scheduler clips each to its drafts, the budget and the free blocks."""
        ...

    def select_drafting(self, requests: Sequence[Request], context: VerifyContext) -> Sequence[bool]:
        """Per decode request (FCFS order): draft after this step? Asked before any of those drafts exist."""
        ...

    def drafts_after_prefill(self, num_requests: int) -> Sequence[bool]:
        """Per request finishing its prefill in this step (FCFS order), does it draft? (The gate has no
        estimate for them; all False while speculation is held off or when the gate drafted for nobody:
        a plain step; on a fresh server at most one, to learn what drafts are worth.)"""
        ...

    def on_verified(self, request: Request, confidences: tuple[float, ...], num_verified: int,
                    num_accepted: int) -> None:
        """A verify step's outcome: the stated confidences c_k of the ``num_verified`` drafts (l_r) and
        the drafts the rejection sampler accepted (before stop checks)."""
        ...

    def on_finished(self, request_id: str) -> None:
        """``request_id`` ended (any final status): release its per-request state."""
        ...


def verify_all_drafts(requests: Sequence[Request]) -> list[int]:
    """The rule without a collaborator: verify every pending draft (the scheduler clips to the budget in
    FCFS order)."""
    return [len(request.drafts.token_ids) for request in requests]
