"""The scheduler's per-step verification hook: requests -> ``VerifyRequest`` -> policy -> l_r.

Token-budget rule (stated once, tested in tests/test_policy_hook.py): every running request's base
token and every running prefill chunk are scheduled first; the policy then shares what is left of
``max_num_batched_tokens`` among verify slots, with B in the objective counting every token of the
step (``num_scheduled_tokens`` already includes the prefill chunks); new waiting requests are admitted
with what the verify slots leave.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scheduler.policy.common import VerifyPlan, VerifyRequest
from scheduler.policy.dspark import plan_budget_k, plan_drafting
from scheduler.policy.spec import PolicySpec, plan_verify
from scheduler.profile.grid import StepTimeModel, drafting_step_time
from scheduler.request import Request
from scheduler.scheduler import VerifyContext

STALE_DRAFT_TOKENS = 32
"""A request's latest confidences estimate its next drafts for this many tokens; older ones (and
requests never drafted) count as unknown, and unknown requests draft (so every request is re-measured
at least every 32 tokens, which costs about ``draft_time(R / 32)`` a step)."""


@dataclass
class _DraftingCost:
    """A StepTimeModel pricing the step with the drafter running for ``num_drafting`` requests."""

    profile: StepTimeModel
    num_drafting: int

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        return drafting_step_time(self.profile, num_tokens, num_requests, self.num_drafting)


@dataclass
class VerifyPolicyHook:
    """Callable passed to ``Scheduler(verify_lengths=...)``.

    Attributes:
        policy: the parsed policy.
        profile: SPS model (an ``OnlineProfile`` kept current by the engine), None for none/fixed.
        clock: monotonic clock in seconds (injectable for simulations).
        last_plan: the plan of the latest step (metrics: verify budget, expected tokens).
        gate_drafting: run the drafting gate (``select_drafting``) for the profile-driven policies.
        last_num_drafting: requests the gate let draft in the latest step (None before any).
    """

    policy: PolicySpec
    profile: StepTimeModel | None = None
    clock: Callable[[], float] = time.monotonic
    last_plan: VerifyPlan | None = None
    gate_drafting: bool = True
    last_num_drafting: int | None = None
    _budget_k: int | None = None
    _first_token_time: dict[str, float] = field(default_factory=dict)

    def _verify_request(self, request: Request, now: float) -> VerifyRequest:
        first = self._first_token_time.setdefault(request.request_id, now)
        target = request.sampling_params.target_tpot_ms
        return VerifyRequest(
            confidences=tuple(request.spec_confidences) or (1.0,) * len(request.spec_token_ids),
            max_verify=len(request.spec_token_ids),
            target_tpot_s=target / 1000.0 if target is not None else None,
            decode_time_s=now - first,
            num_decode_tokens=max(0, request.num_output_tokens - 1),
        )

    def __call__(self, requests: Sequence[Request], budget_left: int, context: VerifyContext) -> list[int]:
        now = self.clock()
        reqs = [self._verify_request(r, now) for r in requests]
        # Decode requests without drafts still count in R and B (one base token each).
        padding = [VerifyRequest((), 0)] * max(0, context.num_decode_requests - len(reqs))
        all_reqs = reqs + padding
        prefill_tokens = context.num_scheduled_tokens - context.num_decode_requests
        budget = context.num_scheduled_tokens + budget_left
        profile = self.profile
        if profile is not None and self.last_num_drafting is not None and self.gate_drafting:
            profile = _DraftingCost(profile, self.last_num_drafting)  # this step drafts about as many
        plan = plan_verify(self.policy, all_reqs, profile, prefill_tokens, budget, self._budget_k)
        if self.policy.kind == "dspark-async" and self.profile is not None:
            # K for the NEXT step from this step's confidences (full search; off the critical path
            # in production, one step stale here).
            self._budget_k = plan_budget_k(all_reqs, profile, prefill_tokens, budget)
        self.last_plan = plan
        return list(plan.lengths[: len(reqs)])

    def select_drafting(self, requests: Sequence[Request], context: VerifyContext) -> list[bool]:
        """The scheduler's drafting gate (``Scheduler(select_drafting=...)``): per decode request,
        draft after this step? ``plan_drafting`` for dspark / dspark-async with a profile that knows
        the drafter's time; everyone drafts under fixed policies; nobody under ``none``."""
        if self.policy.kind == "none":
            self.last_num_drafting = 0
            return [False] * len(requests)
        if not self.gate_drafting or self.profile is None or not self.policy.needs_profile:
            return [True] * len(requests)
        now = self.clock()
        estimates: list[VerifyRequest | None] = []
        for request in requests:
            age = request.num_tokens - request.last_draft_num_tokens
            if not request.last_draft_confidences or age > STALE_DRAFT_TOKENS:
                estimates.append(None)
                continue
            left = request.sampling_params.max_tokens - request.num_output_tokens - 1
            est = self._verify_request(request, now)
            estimates.append(VerifyRequest(request.last_draft_confidences, max(0, min(left, len(
                request.last_draft_confidences))), est.target_tpot_s, est.decode_time_s, est.num_decode_tokens))
        prefill_tokens = context.num_scheduled_tokens - context.num_decode_requests
        flags = plan_drafting(estimates, self.profile, max(0, prefill_tokens), context.token_budget)
        self.last_num_drafting = sum(flags)
        return flags

    def forget(self, request_id: str) -> None:
        """Drop per-request timing of a finished request."""
        self._first_token_time.pop(request_id, None)
