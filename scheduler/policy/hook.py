"""The scheduler's per-step verification hook: requests -> ``VerifyRequest`` -> policy -> l_r.

Token-budget rule (stated once, tested in tests/test_policy.py::test_split_token_budget_rule and
tests/test_scheduler_spec.py::test_verify_lengths_policy_and_clipping): every running request's base
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
"""A request's latest confidences inform the estimate of its next drafts for this many tokens."""
ESTIMATE_SHRINKAGE = 0.5
"""Weight of a request's own latest confidences in the estimate of its next drafts; the rest is the
running mean over all requests. Confidence is very context dependent from one block to the next, so
the latest block alone is a noisy predictor (used alone, it skipped useful drafts at low load)."""
MEAN_RATE = 0.02
"""EWMA rate of the running mean confidence vector, per freshly drafted block."""


@dataclass
class _DraftingCost:
    """A StepTimeModel pricing the step with the drafter running for ``num_drafting`` requests."""

    profile: StepTimeModel
    num_drafting: int
    sampled_fraction: float = 0.0

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        return drafting_step_time(self.profile, num_tokens, num_requests, self.num_drafting, self.sampled_fraction)


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
        last_sampled_fraction: share of sampled (T > 0) requests among them.
    """

    policy: PolicySpec
    profile: StepTimeModel | None = None
    clock: Callable[[], float] = time.monotonic
    last_plan: VerifyPlan | None = None
    gate_drafting: bool = True
    last_num_drafting: int | None = None
    last_sampled_fraction: float = 0.0
    _budget_k: int | None = None
    _mean_confidences: list[float] | None = None
    _first_token_time: dict[str, float] = field(default_factory=dict)

    def _verify_request(
        self, request: Request, now: float, confidences: tuple[float, ...] | None = None,
        max_verify: int | None = None,
    ) -> VerifyRequest:
        """The policy's view of ``request``: its current drafts, or the given estimate of its next ones."""
        first = self._first_token_time.setdefault(request.request_id, now)
        target = request.sampling_params.target_tpot_ms
        if confidences is None:
            confidences = tuple(request.spec_confidences) or (1.0,) * len(request.spec_token_ids)
            max_verify = len(request.spec_token_ids)
        return VerifyRequest(
            confidences=confidences,
            max_verify=max_verify if max_verify is not None else len(confidences),
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
            # this step drafts about as many as the gate chose last step
            profile = _DraftingCost(profile, self.last_num_drafting, self.last_sampled_fraction)
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
        the drafter's time; everyone drafts under fixed policies; nobody under ``none``.

        Estimate of a request's next drafts: ``ESTIMATE_SHRINKAGE`` x its latest confidences (if
        younger than ``STALE_DRAFT_TOKENS``) + the rest x the running mean over all requests; only
        the mean when its own are stale or missing; unknown (always drafts) before any drafts exist.
        """
        if self.policy.kind == "none":
            self.last_num_drafting = 0
            return [False] * len(requests)
        if not self.gate_drafting or self.profile is None or not self.policy.needs_profile:
            return [True] * len(requests)
        if not any(request.spec_token_ids for request in requests):
            self._budget_k = None  # the policy did not run this step: an older K would be stale
        for request in requests:  # blocks drafted after the previous step: fold into the mean once
            if request.last_draft_confidences and request.num_tokens == request.last_draft_num_tokens:
                self._observe_confidences(request.last_draft_confidences)
        now = self.clock()
        estimates = [self._estimate(request, now) for request in requests]
        sampled = [not request.sampling_params.greedy for request in requests]
        fraction = sum(sampled) / len(requests) if requests else 0.0
        # The next step's base: one token per decode request plus this step's prefill chunks (the
        # verify tokens scheduled this step are not part of the next one).
        prefill_tokens = context.num_scheduled_tokens - context.num_decode_requests
        flags = plan_drafting(estimates, self.profile, max(0, prefill_tokens), context.token_budget, fraction)
        self.last_num_drafting = sum(flags)
        drafting_sampled = sum(f and s for f, s in zip(flags, sampled, strict=True))
        self.last_sampled_fraction = drafting_sampled / self.last_num_drafting if self.last_num_drafting else 0.0
        return flags

    def _observe_confidences(self, confidences: Sequence[float]) -> None:
        mean = self._mean_confidences
        if mean is None or len(mean) != len(confidences):
            self._mean_confidences = [float(c) for c in confidences]
            return
        for k, c in enumerate(confidences):
            mean[k] += MEAN_RATE * (float(c) - mean[k])

    def _estimate(self, request: Request, now: float) -> VerifyRequest | None:
        if request.sampling_params.needs_penalties:
            return VerifyRequest((), 0)  # penalised requests never draft (engine/spec/verify_step.py)
        # Drafts made after this step are verified in the next, after this step's token: at most
        # max_tokens - (outputs + 1) - 1 of them can be (scheduler.request_rules.draft_cap).
        left = request.sampling_params.max_tokens - request.num_output_tokens - 2
        if left <= 0:
            return VerifyRequest((), 0)
        own = request.last_draft_confidences
        if own and request.num_tokens - request.last_draft_num_tokens > STALE_DRAFT_TOKENS:
            own = ()
        mean = self._mean_confidences
        if not own and mean is None:
            return None
        if own and mean is not None and len(mean) == len(own):
            conf = tuple(ESTIMATE_SHRINKAGE * a + (1 - ESTIMATE_SHRINKAGE) * m for a, m in zip(own, mean, strict=True))
        else:
            conf = tuple(own or mean or ())
        return self._verify_request(request, now, conf, min(left, len(conf)))

    def forget(self, request_id: str) -> None:
        """Drop per-request timing of a finished request."""
        self._first_token_time.pop(request_id, None)
