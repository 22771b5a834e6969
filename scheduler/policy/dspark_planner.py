"""DSpark's confidence-scheduled verification (DESIGN.md section 1; paper Algorithm 1).

Each step, for R decode requests with drafts and T prefill tokens in the same batch:

    B = T + sum_r (1 + l_r)                        batch tokens of the step
    E = sum_r (1 + sum_{j<=l_r} a_{r,j})           expected emitted tokens
    Theta = E * SPS(B, R) = E / step_time(B, R)    maximised

Per-request TPOT goals (``slo_weight``, w_r >= 1, 1 without a goal) scale the *gain* of a request's
slots, ``w_r * a_{r,j}``, in the ranking and in the admission test, but not E on the cost side: a
request behind its goal gets slots that plain throughput would not pay for, while everyone else's
tokens keep their value (weighting E itself would make one prioritised request starve the rest).

**Why the greedy stops early.** c_{r,j} depends on the sampled draft d_{r,j-1}, so a_{r,j+1} carries
information about d_{r,j}. Speculative sampling is lossless only if the decision to verify d_{r,j}
is independent of d_{r,j} given the past (a stopping time). Slots are visited by a descending
``w_r * a_{r,j}``, ties by position then request, so every slot visited before (r, j) belongs to
another request or to r's own prefix; the decision on (r, j) is taken before anything that depends
on d_{r,j} is looked at. Stopping at the first slot that does not improve Theta keeps this. A full
search (the best l over all slots) would let a_{r,j+1} decide whether d_{r,j} is verified and bias
the output (paper Appendix A: (0.85, 0.15) instead of (0.7, 0.3); tests/scheduler/policy/test_policy_lossless.py).

**Drafting gate.** Verification only chooses among drafts that exist, and the drafter forward costs a
share of every step (profile ``draft_time(R)``; 0.28x a target step at R = 64 on the CPU here). So
before drafting, ``plan_drafting`` runs the same objective with the drafter's cost on the cost side,
with an estimate of each request's next confidences (the hook blends its latest drafts' confidences
with the running mean over all requests):

    Theta(k) = (R + sum_{top k slots} w a) / (t(T + R + k, R) - t_d(R) + t_d(D_k))

D_k = requests owning one of the top k slots (plus those that must draft anyway). Requests outside
D_{k*} skip the drafter this step; when nothing pays (high load) nobody drafts and speculation costs
nothing. The gate is decided before the drafts it concerns exist, so it cannot bias verification.

The production variant (``dspark-async``) gets its budget K from a *full* search over the
confidences of an earlier step (already verified drafts, so no leak; it can run off the critical
path and sees past jagged steps of the SPS curve), then takes this step's top-K slots in the same
order: a top-K cut is non-anticipating for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from sparkserve.scheduler.policy.common import VerifyPlan, VerifyRequest
from sparkserve.scheduler.profile.grid import StepTimeModel, ThroughputProfile, drafting_step_time
from sparkserve.scheduler.profile.online import OnlineProfile


class Slot(NamedTuple):
    """One verify slot: draft ``position`` (0-based; verifying it makes l_r = position + 1) of
    ``request`` with survival ``survival`` and ranking key ``weighted = w_r * survival``."""

    weighted: float
    position: int
    request: int
    survival: float


def ranked_slots(reqs: Sequence[VerifyRequest]) -> list[Slot]:
    """All slots with a > 0 within each request's cap, ordered by ``w_r * a`` descending, ties by
    position then request. Within a request, a is non-increasing (fp32 cumulative product, as in
    ``survival``), so a slot always comes after its own prefix. Vectorised over the batch."""
    caps = [min(req.max_verify, len(req.confidences)) for req in reqs]
    width = max(caps, default=0)
    if width == 0:
        return []
    conf = np.zeros((len(reqs), width), dtype=np.float32)  # [R, width], 0 past each cap
    for r, (req, cap) in enumerate(zip(reqs, caps, strict=True)):
        conf[r, :cap] = req.confidences[:cap]
    if not np.all((conf >= 0) & (conf <= 1)):  # also rejects NaN
        raise ValueError("confidences must lie in [0, 1]")
    survival = np.cumprod(conf, axis=1, dtype=np.float32)  # [R, width]
    weights = np.array([req.slo_weight for req in reqs])  # [R]
    request, position = np.nonzero(survival > 0)  # [num_slots] each
    a = survival[request, position].astype(np.float64)  # [num_slots]
    weighted = a * weights[request]  # [num_slots]
    order = np.lexsort((request, position, -weighted))  # primary key last
    return list(
        map(
            Slot,
            weighted[order].tolist(),
            position[order].tolist(),
            request[order].tolist(),
            a[order].tolist(),
        )
    )


def _base_tokens(num_requests: int, prefill_tokens: int, token_budget: int) -> int:
    base = prefill_tokens + num_requests
    if prefill_tokens < 0 or base > token_budget:
        raise ValueError(
            f"{prefill_tokens} prefill + {num_requests} base tokens do not fit the budget of {token_budget}"
        )
    return base


def _plan(
    reqs: Sequence[VerifyRequest], admitted: Sequence[Slot], base: int, profile: StepTimeModel | None
) -> VerifyPlan:
    lengths = [0] * len(reqs)
    for slot in admitted:
        lengths[slot.request] += 1
    expected = len(reqs) + sum(slot.survival for slot in admitted)
    batch = base + len(admitted)
    theta = expected / profile.step_time(batch, len(reqs)) if profile is not None and reqs else None
    return VerifyPlan(tuple(lengths), expected, batch, theta)


def verify_dspark(
    reqs: Sequence[VerifyRequest], profile: StepTimeModel, prefill_tokens: int, token_budget: int
) -> VerifyPlan:
    """Algorithm 1 with early stopping (lossless): admit slots in ``ranked_slots`` order while each
    improves Theta and fits ``token_budget`` (B <= budget, prefill tokens counted in B).

    The improvement test ``(E + w a) / t(B + 1) > E / t(B)`` is evaluated as
    ``w a * t(B) > E * (t(B + 1) - t(B))`` so that with a flat profile every slot with a > 0 passes
    however small a is next to E. E accumulates the unweighted a (see the module docstring).
    """
    num_requests = len(reqs)
    base = _base_tokens(num_requests, prefill_tokens, token_budget)
    slots = ranked_slots(reqs)
    admitted: list[Slot] = []
    if slots:
        expected = float(num_requests)  # E at l = 0
        batch, step = base, profile.step_time(base, num_requests)
        for slot in slots:
            if batch + 1 > token_budget:
                break
            next_step = profile.step_time(batch + 1, num_requests)
            if not slot.weighted * step > expected * (next_step - step):
                break  # first slot that does not improve Theta: stop (non-anticipating)
            admitted.append(slot)
            expected += slot.survival
            batch, step = batch + 1, next_step
    return _plan(reqs, admitted, base, profile)


def plan_budget_k(
    prev_reqs: Sequence[VerifyRequest], profile: StepTimeModel, prefill_tokens: int, token_budget: int
) -> int:
    """The verify budget K for a later step: full search over the top-k prefixes of an earlier
    step's ranked slots, ``K = argmax_k (R + sum_{top k} w a) / t(T + R + k, R)`` (smallest k on
    ties; with all w = 1 this is Theta(k) exactly). Full search is safe only because these drafts
    are already verified; never feed it the confidences of the step being planned."""
    num_requests = len(prev_reqs)
    base = _base_tokens(num_requests, prefill_tokens, token_budget)
    slots = ranked_slots(prev_reqs)[: token_budget - base]
    return _best_prefix(slots, num_requests, lambda k, _: profile.step_time(base + k, num_requests),
                        monotone=monotone_profile(profile))


def monotone_profile(profile: StepTimeModel) -> bool:
    """Whether ``profile``'s step time is non-decreasing in B and R and its drafter time in the drafting
    requests: true of every ``ThroughputProfile`` (its ``__post_init__`` rejects a grid or drafter curve that
    decreases, and both are interpolated linearly) and of an ``OnlineProfile`` (its corrected grid is one,
    its drafter curve the base's times a constant)."""
    return isinstance(profile, (ThroughputProfile, OnlineProfile))


def _best_prefix(
    slots: Sequence[Slot], num_requests: int, step_time: Callable[[int, int], float], margin: float = 0.0,
    monotone: bool = False,
) -> int:
    """Full search: the k maximising ``Theta(k) = (R + sum_{top k} w a) / step_time(k, owners_k)``, where
    owners_k = distinct requests among the top k slots; 0 unless some Theta(k) exceeds ``(1 - margin)``
    x Theta(0); smallest k on ties.

    With ``monotone`` (``step_time`` non-decreasing in k and owners, ``monotone_profile``) the search stops
    at the first k where even every remaining slot's gain at this step time could not beat the best:
    ``Theta(k') <= (R + sum_{all} w a) / step_time(k, owners_k)`` for every k' > k (gains are >= 0), so the
    result is the full search's. Where drafts are poor (nobody drafts) that is after a few slots instead of
    all R * gamma step-time evaluations (issue 25: the gate's cost in steps where nobody drafts)."""
    objective = float(num_requests)
    best_k, best = 0, (1.0 - margin) * objective / step_time(0, 0)
    remaining = sum(slot.weighted for slot in slots)
    owners: set[int] = set()
    for k, slot in enumerate(slots, start=1):
        objective += slot.weighted
        remaining -= slot.weighted
        owners.add(slot.request)
        time_k = step_time(k, len(owners))
        theta = objective / time_k
        if theta > best:
            best_k, best = k, theta
        elif monotone and (objective + max(remaining, 0.0)) * (1.0 + 1e-9) / time_k < best:
            break
    return best_k


def verify_dspark_async(
    reqs: Sequence[VerifyRequest],
    profile: StepTimeModel | None,
    prefill_tokens: int,
    token_budget: int,
    budget_k_from_earlier_step: int,
) -> VerifyPlan:
    """Production variant: this step's top-K slots by current ``w_r * a`` (ties by position, so a
    deeper slot never displaces its own prefix), K from ``plan_budget_k`` on an earlier step,
    capped by the token budget. ``profile`` only fills in ``theta``."""
    if budget_k_from_earlier_step < 0:
        raise ValueError(f"budget K must be >= 0, got {budget_k_from_earlier_step}")
    base = _base_tokens(len(reqs), prefill_tokens, token_budget)
    k = min(budget_k_from_earlier_step, token_budget - base)
    return _plan(reqs, ranked_slots(reqs)[:k], base, profile)


def plan_drafting(
    estimates: Sequence[VerifyRequest | None],
    profile: StepTimeModel,
    prefill_tokens: int,
    token_budget: int,
    sampled_fraction: float = 0.0,
    margin: float = 0.0,
) -> list[bool]:
    """Which decode requests should draft (drafting gate, module docstring): full search of
    ``Theta(k)`` over the top-k slots of the estimated confidences, drafter cost included.

    estimates: per decode request (all R of the step, FCFS), its expected drafts as a VerifyRequest
        built from its confidences, or None when unknown (never drafted yet): those always draft, and
        their drafter cost counts on both sides of the comparison. A request that cannot draft gets
        ``VerifyRequest((), 0)`` (no slots: never chosen).
    prefill_tokens: tokens of the next step beyond one per decode request (its prefill chunks).
    sampled_fraction: share of sampled (T > 0) requests, which draft at a higher cost.
    margin: a drafting set is taken when its Theta exceeds ``(1 - margin)`` x Theta without drafting.
        0 by default (issue 25): a positive margin (0.1 before) drafted where the profile itself
        predicted a loss, and the diagnosis found those cells losing (docs/benchmarks.md, "Why the
        default lost to --drafter none").
    Returns a flag per request; ``[True] * R`` when the profile has no measured drafter time
    (``has_draft_time``). Raises ValueError when the base tokens do not fit ``token_budget``.

    The search follows the global slot ranking (as verification does), so it is exact when slots
    are the only cost; with a per-request drafter cost the best set is a knapsack-like choice, and a
    weaker request whose slot ranks first can hide a subset that would pay (e.g. two requests at 0.75
    where only the one with a second good slot pays for its drafter time). Correcting that would need
    per-request bundles; at these drafter costs the ranking's choice is what the benchmarks measure.
    """
    num_requests = len(estimates)
    base = _base_tokens(num_requests, prefill_tokens, token_budget)
    if not getattr(profile, "has_draft_time", False):
        return [True] * num_requests
    unknown = [est is None for est in estimates]
    known = [i for i, est in enumerate(estimates) if est is not None]
    forced = sum(unknown)

    def step_time(k: int, num_owners: int) -> float:
        return drafting_step_time(profile, base + k, num_requests, forced + num_owners, sampled_fraction)

    slots = ranked_slots([estimates[i] for i in known])[: token_budget - base]  # type: ignore[misc]
    best_k = _best_prefix(slots, num_requests, step_time, margin, monotone_profile(profile))
    chosen = {known[slot.request] for slot in slots[:best_k]}
    return [unknown[i] or i in chosen for i in range(num_requests)]
