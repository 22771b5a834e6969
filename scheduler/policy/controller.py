"""The speculation controller: the one owner of speculation's feedback state, the scheduler's collaborator.

It implements ``sparkserve.scheduler.speculation.Speculation`` and is handed to the ``Scheduler`` at
construction. Each step the scheduler calls ``verify_lengths`` (how many drafts each decode request
verifies) and ``select_drafting`` (who drafts after the step), then ``on_verified`` for every verify step
with drafts and ``on_finished`` for every request that ends (aborts included); the engine reports every
step (``observe_step``). The controller owns what these learn:
the online throughput profile, per-request timings (TPOT goals), the drafting gate's running mean of
confidences and the budget K of ``dspark-async``; metrics read it through ``stats()``.

Token-budget rule (the scheduler applies it, ``sparkserve.scheduler.scheduler``'s module docstring; tested in
tests/scheduler/test_scheduler_spec.py::test_verify_lengths_policy_and_clipping): every running request's base
token and every running prefill chunk are scheduled first; the policy then shares what is left of
``max_num_batched_tokens`` among verify slots, with B in the objective counting every token of the
step (``num_scheduled_tokens`` already includes the prefill chunks); new waiting requests are admitted
with what the verify slots leave.

``dspark-async`` computes its next budget K (a full search over this step's confidences, already being
verified) on a helper thread while the step's model forward runs, so the policy adds no step time: the
scheduler only cuts the current ranking at the K computed during the previous step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from sparkserve.scheduler.policy.acceptance import RequestAcceptance
from sparkserve.scheduler.policy.calibration import CalibrationRow, OnlineCalibration
from sparkserve.scheduler.policy.common import VerifyPlan, VerifyRequest
from sparkserve.scheduler.policy.dspark_planner import plan_budget_k, plan_drafting
from sparkserve.scheduler.policy.guard import GuardStats, SpeculationGuard
from sparkserve.scheduler.policy.spec import PolicySpec, plan_verify
from sparkserve.scheduler.profile.grid import StepTimeModel, ThroughputProfile, drafting_step_time
from sparkserve.scheduler.request import Request
from sparkserve.scheduler.request_rules import may_draft
from sparkserve.scheduler.speculation import VerifyContext

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


@dataclass(frozen=True)
class StepObservation:
    """One engine step as the controller learns from it.

    Attributes:
        num_batched_tokens: B, tokens fed to the target.
        num_decode_requests: R, requests that sampled.
        num_drafting: requests the drafter ran for after the step.
        duration_s: wall time of the step, seconds.
        num_verify_tokens: draft tokens verified in the step (sum l_r).
        num_accepted_tokens: drafts accepted in the step.
    """

    num_batched_tokens: int
    num_decode_requests: int
    num_drafting: int
    duration_s: float
    num_verify_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(frozen=True)
class ControllerStats:
    """What metrics read from the controller.

    Attributes:
        policy: the verification policy (``str(PolicySpec)``).
        verify_budget: verify slots of the latest plan (sum l_r), None before any.
        expected_tokens / theta: E and E * SPS(B, R) of the latest plan.
        num_drafting: requests the gate let draft in the latest step (None before any).
        profile: the throughput profile the policy uses now (drift-corrected), None without one.
        num_tracked_requests: requests with per-request state (must fall back to 0 when idle).
        calibration: cumulative stated / corrected vs realised survival per drafter, class, position.
        guard: the speculation guard's state, None without a guard.
    """

    policy: str
    verify_budget: int | None
    expected_tokens: float | None
    theta: float | None
    num_drafting: int | None
    profile: ThroughputProfile | None
    num_tracked_requests: int
    calibration: tuple[CalibrationRow, ...] = ()
    guard: GuardStats | None = None


@dataclass
class SpeculationController:
    """The scheduler's speculation collaborator and the feedback state of speculative decoding (module docstring).

    Attributes:
        policy: the parsed policy.
        profile: SPS model (an ``OnlineProfile``, corrected by ``observe_step``), None for none / fixed.
        clock: monotonic clock in seconds (injectable for simulations).
        gate_drafting: run the drafting gate for the profile-driven policies.
        num_lookahead_tokens: gamma (drafting rule ``request_rules.may_draft``).
        calibration: the online correction of confidences, None to rank by the drafter's own.
        guard: backs speculation off where it measurably loses (``guard.py``), None for no guard.
        acceptance: per-request acceptance ratios and probes (``acceptance.py``), None for neither.
        last_plan: the plan of the latest step.
        last_num_drafting / last_sampled_fraction: the gate's latest choice.
    """

    policy: PolicySpec
    profile: StepTimeModel | None = None
    clock: Callable[[], float] = time.monotonic
    gate_drafting: bool = True
    num_lookahead_tokens: int = 1
    calibration: OnlineCalibration | None = field(default_factory=OnlineCalibration)
    guard: SpeculationGuard | None = None
    acceptance: RequestAcceptance | None = field(default_factory=RequestAcceptance)
    last_plan: VerifyPlan | None = None
    last_num_drafting: int | None = None
    last_sampled_fraction: float = 0.0
    _budget_k: int | None = None
    _next_k: Future | None = None
    _mean_confidences: list[float] | None = None
    _first_token_time: dict[str, float] = field(default_factory=dict)
    _executor: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- scheduler hooks
    def verify_lengths(self, requests: Sequence[Request], budget_left: int, context: VerifyContext) -> list[int]:
        """l_r per decode request with drafts (``Speculation.verify_lengths``); all 0 while the guard
        holds speculation off."""
        if self.guard is not None and not self.guard.speculating:
            self.last_plan = None
            return [0] * len(requests)
        now = self.clock()
        reqs = [self._verify_request(r, now) for r in requests]
        # Decode requests without drafts still count in R and B (one base token each).
        all_reqs = reqs + [VerifyRequest((), 0)] * max(0, context.num_decode_requests - len(reqs))
        prefill_tokens = context.num_scheduled_tokens - context.num_decode_requests
        budget = context.num_scheduled_tokens + budget_left
        profile = self.profile
        if profile is not None and self.last_num_drafting is not None and self.gate_drafting:
            profile = _DraftingCost(profile, self.last_num_drafting, self.last_sampled_fraction)
        if self.policy.kind == "dspark-async" and self._next_k is not None:
            self._budget_k = self._next_k.result()
            self._next_k = None
        plan = plan_verify(self.policy, all_reqs, profile, prefill_tokens, budget, self._budget_k)
        if self.policy.kind == "dspark-async" and self.profile is not None:
            # K for the NEXT step from this step's confidences (full search), off the critical path, on
            # an immutable snapshot of the profile (the engine corrects the live one after the step).
            snapshot: StepTimeModel = getattr(self.profile, "current", self.profile)
            if self.last_num_drafting is not None and self.gate_drafting:
                snapshot = _DraftingCost(snapshot, self.last_num_drafting, self.last_sampled_fraction)
            self._next_k = self._pool().submit(plan_budget_k, all_reqs, snapshot, prefill_tokens, budget)
        self.last_plan = plan
        lengths = list(plan.lengths[: len(reqs)])
        if self.acceptance is not None and self.policy.needs_profile:  # probes: the drafts exist already
            for i, request in enumerate(requests):
                if request.drafts.token_ids:
                    probe = self.acceptance.probe_length(request.request_id, len(request.drafts.token_ids))
                    lengths[i] = max(lengths[i], probe)
        return lengths

    def select_drafting(self, requests: Sequence[Request], context: VerifyContext) -> list[bool]:
        """Per decode request, draft after this step? (``Speculation.select_drafting``).

        ``plan_drafting`` for dspark / dspark-async with a profile that knows the drafter's time;
        everyone drafts under fixed policies; nobody under ``none``. Estimate of a request's next
        drafts: ``ESTIMATE_SHRINKAGE`` x its latest confidences (if younger than ``STALE_DRAFT_TOKENS``)
        + the rest x the running mean over all requests; only the mean when its own are stale or
        missing; unknown (always drafts) before any drafts exist.
        """
        if self.policy.kind == "none" or (self.guard is not None and not self.guard.speculating):
            self.last_num_drafting = 0
            self.last_sampled_fraction = 0.0
            return [False] * len(requests)
        if not self.gate_drafting or self.profile is None or not self.policy.needs_profile:
            return [True] * len(requests)
        if not any(request.drafts.token_ids for request in requests):
            self._budget_k = None  # the policy did not run this step: an older K would be stale
            self._next_k = None
        for request in requests:  # blocks drafted after the previous step: fold into the mean once
            state = request.drafts
            if state.last_confidences and request.num_tokens == state.last_num_tokens:
                self._observe_confidences(self.corrected(state.last_drafter, request, state.last_confidences))
        now = self.clock()
        estimates = [self._estimate(request, now) for request in requests]
        sampled = [not request.sampling_params.greedy for request in requests]
        fraction = sum(sampled) / len(requests) if requests else 0.0
        # The next step's base: one token per decode request plus this step's prefill chunks.
        prefill_tokens = context.num_scheduled_tokens - context.num_decode_requests
        if self._mean_confidences is None:
            # Nothing drafted yet (fresh server): one request drafts to learn what drafts are worth;
            # drafting for all of them at once would spend a drafter forward on each before knowing.
            first = next((i for i, e in enumerate(estimates) if e is None), None)
            estimates = [VerifyRequest((), 0) if e is None and i != first else e for i, e in enumerate(estimates)]
        flags = plan_drafting(estimates, self.profile, max(0, prefill_tokens), context.token_budget, fraction)
        flags = self._probe_drafting(requests, estimates, flags, max(0, prefill_tokens), context.token_budget, fraction)
        self.last_num_drafting = sum(flags)
        drafting_sampled = sum(f and s for f, s in zip(flags, sampled, strict=True))
        self.last_sampled_fraction = drafting_sampled / self.last_num_drafting if self.last_num_drafting else 0.0
        return flags

    def drafts_after_prefill(self, num_requests: int) -> list[bool]:
        """Which requests finishing their prefill draft (``Speculation.drafts_after_prefill``): none when the
        policy is none, the guard holds speculation off, or the gate drafted for nobody in this step; on a
        fresh server (no confidences seen) only the first, and only when no decode request drafts (one
        drafter row learns what drafts are worth; drafting for all c at once would spend a drafter row on
        each before knowing); otherwise all."""
        if self.policy.kind == "none" or (self.guard is not None and not self.guard.speculating):
            return [False] * num_requests
        if not (self.gate_drafting and self.profile is not None and self.policy.needs_profile):
            return [True] * num_requests
        if self._mean_confidences is None:
            return [i == 0 and not self.last_num_drafting for i in range(num_requests)]
        return [self.last_num_drafting != 0] * num_requests

    def on_verified(self, request: Request, confidences: tuple[float, ...], num_verified: int,
                    num_accepted: int) -> None:
        """A verify step's outcome (``Speculation.on_verified``): feeds the request's acceptance ratio (against
        the table's prediction before this outcome) and the online calibration."""
        if self.acceptance is not None:
            predicted = (self.calibration.correct(request.drafts.drafter, request.sampling_params.greedy, confidences)
                         if self.calibration is not None else confidences)
            self.acceptance.observe(request.request_id, predicted, num_verified, num_accepted)
        if self.calibration is not None:
            self.calibration.observe(request.drafts.drafter, request.sampling_params.greedy, confidences, num_verified,
                                     num_accepted)

    def corrected(self, drafter: str, request: Request, confidences: tuple[float, ...]) -> tuple[float, ...]:
        """Confidences as the policy ranks them: corrected online for this drafter and temperature class, then
        by the request's own acceptance ratio."""
        if not confidences:
            return confidences
        if self.calibration is not None:
            confidences = self.calibration.correct(drafter, request.sampling_params.greedy, confidences)
        if self.acceptance is not None:
            confidences = self.acceptance.correct(request.request_id, confidences)
        return confidences

    def on_finished(self, request_id: str) -> None:
        """Release a finished request's state (``Speculation.on_finished``: every finish, aborts too)."""
        self._first_token_time.pop(request_id, None)
        if self.acceptance is not None:
            self.acceptance.release(request_id)

    # ---------------------------------------------------------------- feedback
    def observe_step(self, step: StepObservation) -> None:
        """Correct the online profile with a measured step and tell the guard its outcome. The profile
        prices a step that drafts for every request greedily: add back what the gate saved, take off
        what sampled drafting cost."""
        profile = self.profile
        if profile is None or not step.num_decode_requests:
            return
        if self.guard is not None:
            base = getattr(profile, "base", profile)  # the start-up profile: the guard corrects it itself
            plain = drafting_step_time(base, step.num_batched_tokens - step.num_verify_tokens,
                                       step.num_decode_requests, 0)
            self.guard.observe(step.num_decode_requests, step.num_decode_requests + step.num_accepted_tokens,
                               step.num_verify_tokens, max(step.duration_s, 1e-6), plain, step.num_drafting)
        if not hasattr(profile, "observe"):
            return
        saved = profile.draft_time(step.num_decode_requests) - profile.draft_time(
            step.num_drafting, self.last_sampled_fraction)
        profile.observe(step.num_batched_tokens, step.num_decode_requests, max(step.duration_s + saved, 1e-6))

    def stats(self) -> ControllerStats:
        """A typed snapshot for metrics."""
        plan = self.last_plan
        profile = self.profile
        current = getattr(profile, "current", profile)
        return ControllerStats(
            policy=str(self.policy),
            verify_budget=plan.num_verify_tokens if plan is not None else None,
            expected_tokens=plan.expected_tokens if plan is not None else None,
            theta=plan.theta if plan is not None else None,
            num_drafting=self.last_num_drafting,
            profile=current if isinstance(current, ThroughputProfile) else None,
            num_tracked_requests=len(self._first_token_time),
            calibration=tuple(self.calibration.report()) if self.calibration is not None else (),
            guard=self.guard.stats() if self.guard is not None else None,
        )

    def close(self) -> None:
        """Stop the helper thread of ``dspark-async`` (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---------------------------------------------------------------- internals
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-async-k")
        return self._executor

    def _verify_request(self, request: Request, now: float, confidences: tuple[float, ...] | None = None,
                        max_verify: int | None = None) -> VerifyRequest:
        """The policy's view of ``request``: its current drafts, or the given estimate of its next ones."""
        first = self._first_token_time.setdefault(request.request_id, now)
        target = request.sampling_params.target_tpot_ms
        if confidences is None:
            drafts = request.drafts
            confidences = self.corrected(drafts.drafter, request, drafts.confidences) or (1.0,) * len(drafts.token_ids)
            max_verify = len(drafts.token_ids)
        return VerifyRequest(
            confidences=confidences,
            max_verify=max_verify if max_verify is not None else len(confidences),
            target_tpot_s=target / 1000.0 if target is not None else None,
            decode_time_s=now - first,
            num_decode_tokens=max(0, request.num_output_tokens - 1),
        )

    def _probe_drafting(self, requests: Sequence[Request], estimates: list[VerifyRequest | None], flags: list[bool],
                        prefill_tokens: int, token_budget: int, fraction: float) -> list[bool]:
        """Probing requests the gate left out draft when drafting would pay with their own latest stated
        confidences (``acceptance.py``): the correction's caution must not keep a good drafter from ever
        being verified, and where even the stated confidences do not pay nobody probes."""
        if self.acceptance is None or self.profile is None:
            return flags
        probing = [not f and e is not None and bool(r.drafts.last_confidences) and self.acceptance.probing(r.request_id)
                   for f, e, r in zip(flags, estimates, requests, strict=True)]
        if not any(probing):
            return flags
        now = self.clock()
        optimistic = [self._verify_request(r, now, r.drafts.last_confidences, e.max_verify) if p and e is not None else e
                      for p, e, r in zip(probing, estimates, requests, strict=True)]
        stated = plan_drafting(optimistic, self.profile, prefill_tokens, token_budget, fraction)
        return [f or (p and s) for f, p, s in zip(flags, probing, stated, strict=True)]

    def _observe_confidences(self, confidences: Sequence[float]) -> None:
        mean = self._mean_confidences
        if mean is None or len(mean) != len(confidences):
            self._mean_confidences = [float(c) for c in confidences]
            return
        for k, c in enumerate(confidences):
            mean[k] += MEAN_RATE * (float(c) - mean[k])

    def _estimate(self, request: Request, now: float) -> VerifyRequest | None:
        if not may_draft(request, self.num_lookahead_tokens):
            return VerifyRequest((), 0)  # the drafting rule: it could not use drafts (never chosen)
        # Drafts made after this step are verified in the next, after this step's token.
        left = request.sampling_params.max_tokens - request.num_output_tokens - 2
        state = request.drafts
        own = self.corrected(state.last_drafter, request, state.last_confidences)
        if own and request.num_tokens - state.last_num_tokens > STALE_DRAFT_TOKENS:
            own = ()
        mean = self._mean_confidences
        if not own and mean is None:
            return None
        if own and mean is not None and len(mean) == len(own):
            conf = tuple(ESTIMATE_SHRINKAGE * a + (1 - ESTIMATE_SHRINKAGE) * m for a, m in zip(own, mean, strict=True))
        else:
            conf = tuple(own or mean or ())
        return self._verify_request(request, now, conf, min(left, len(conf)))
