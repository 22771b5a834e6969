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
from scheduler.policy.dspark import plan_budget_k
from scheduler.policy.spec import PolicySpec, plan_verify
from scheduler.profile.grid import StepTimeModel
from scheduler.request import Request
from scheduler.scheduler import VerifyContext


@dataclass
class VerifyPolicyHook:
    """Callable passed to ``Scheduler(verify_lengths=...)``.

    Attributes:
        policy: the parsed policy.
        profile: SPS model (an ``OnlineProfile`` kept current by the engine), None for none/fixed.
        clock: monotonic clock in seconds (injectable for simulations).
        last_plan: the plan of the latest step (metrics: verify budget, expected tokens).
    """

    policy: PolicySpec
    profile: StepTimeModel | None = None
    clock: Callable[[], float] = time.monotonic
    last_plan: VerifyPlan | None = None
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
        plan = plan_verify(self.policy, all_reqs, self.profile, prefill_tokens, budget, self._budget_k)
        if self.policy.kind == "dspark-async" and self.profile is not None:
            # K for the NEXT step from this step's confidences (full search; off the critical path
            # in production, one step stale here).
            self._budget_k = plan_budget_k(all_reqs, self.profile, prefill_tokens, budget)
        self.last_plan = plan
        return list(plan.lengths[: len(reqs)])

    def forget(self, request_id: str) -> None:
        """Drop per-request timing of a finished request."""
        self._first_token_time.pop(request_id, None)
