"""Verification policies: hand-computed cases, properties, the budget rule and an SLO simulation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.scheduler.policy import (
    SLO_MAX_WEIGHT,
    PolicySpec,
    VerifyRequest,
    parse_policy,
    plan_budget_k,
    plan_drafting,
    plan_verify,
    ranked_slots,
    slo_weight,
    survival,
    verify_dspark,
    verify_dspark_async,
    verify_fixed,
    verify_none,
)
from sparkserve.scheduler.profile import ThroughputProfile

PROFILE_PATH = Path(__file__).resolve().parents[2] / "data" / "profile_small.json"


class Linear:
    """Fake step-time model: t(B) = t0 + per_token * B seconds."""

    def __init__(self, t0: float, per_token: float) -> None:
        self.t0, self.per_token = t0, per_token

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        return self.t0 + self.per_token * num_tokens


FLAT = Linear(1.0, 0.0)  # verify tokens are free


class Steep:
    """t(B) = e^(3B): one more token multiplies the step by 20, so no slot pays, even with the
    largest SLO weight (w a <= 16 < 19 <= E (e^3 - 1))."""

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        return math.exp(3 * min(num_tokens, 230))


def req(*confidences: float, max_verify: int | None = None, **kw: float) -> VerifyRequest:
    cap = len(confidences) if max_verify is None else max_verify
    return VerifyRequest(tuple(confidences), cap, **kw)  # type: ignore[arg-type]


# ---- survival ------------------------------------------------------------------------------------


def test_survival_is_fp32_cumprod() -> None:
    assert survival([]) == []
    assert survival([0.5, 0.5, 1.0]) == [0.5, 0.25, 0.25]
    a = survival([0.9, 0.8])
    assert a == [float(np.float32(0.9)), float(np.float32(np.float32(0.9) * np.float32(0.8)))]


def test_survival_saturated_sigmoids_stay_non_increasing() -> None:
    a = survival([0.99999994] * 50 + [1.0] * 5)
    assert all(y <= x for x, y in zip(a, a[1:], strict=False))
    assert a[0] == float(np.float32(0.99999994)) < 1.0


@pytest.mark.parametrize("bad", [[1.5], [-0.1], [float("nan")]])
def test_survival_rejects_out_of_range(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="confidences"):
        survival(bad)


@given(st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.99999994, 1e-45, 0.5])), max_size=16))
def test_survival_property_non_increasing_in_unit_interval(confidences: list[float]) -> None:
    a = survival(confidences)
    assert len(a) == len(confidences)
    assert all(0.0 <= x <= 1.0 for x in a)
    assert all(y <= x for x, y in zip(a, a[1:], strict=False))


# ---- dspark (Algorithm 1) on hand-built tables ----------------------------------------------------


def test_dspark_intermediate_case_by_hand() -> None:
    # a: r0 = (0.9, 0.72, 0.36), r1 = (0.6, 0.3); t(B) = 1 + 0.2 B; start B = 2, t = 1.4, E = 2.
    # 0.9*1.4 > 2*0.2 (admit) -> 0.72*1.6 > 2.9*0.2 (admit) -> 0.6*1.8 > 3.62*0.2 (admit)
    # -> 0.36*2.0 = 0.72 <= 4.22*0.2 = 0.844: stop. Theta = 4.22 / 2.0.
    reqs = [req(0.9, 0.8, 0.5), req(0.6, 0.5)]
    plan = verify_dspark(reqs, Linear(1.0, 0.2), prefill_tokens=0, token_budget=100)
    assert plan.lengths == (2, 1)
    assert plan.batch_tokens == 5
    assert plan.expected_tokens == pytest.approx(4.22, abs=1e-6)
    assert plan.theta == pytest.approx(4.22 / 2.0, abs=1e-6)
    assert (4.22 + 0.36) / 2.2 < plan.theta  # the next slot would have lowered Theta


def test_dspark_counts_prefill_in_batch() -> None:
    # Same table, 10 prefill tokens: t = 1 + 0.2 B starts at 3.4; 0.9 * 3.4 > 0.4 ... slots are cheaper
    # relative to a bigger step, so more are admitted; B includes T.
    plan = verify_dspark([req(0.9, 0.8, 0.5), req(0.6, 0.5)], Linear(1.0, 0.2), 10, 100)
    assert plan.batch_tokens == 10 + 2 + plan.num_verify_tokens
    assert plan.lengths == (3, 2)


def test_dspark_flat_profile_admits_every_positive_slot() -> None:
    reqs = [req(0.9, 1e-30, 0.5), req(0.0, 0.9), req(0.3, 0.3, 0.3, max_verify=1), req()]
    assert verify_dspark(reqs, FLAT, 0, 1000).lengths == (3, 0, 1, 0)


def test_dspark_steep_profile_admits_none() -> None:
    plan = verify_dspark([req(1.0, 1.0), req(0.99)], Steep(), 0, 1000)
    assert plan.lengths == (0, 0) and plan.expected_tokens == 2 and plan.batch_tokens == 2


def test_dspark_stops_at_first_non_improving_slot_on_jagged_profile() -> None:
    # Appendix-A-style jagged profile: slot 2 alone does not pay, slots 2+3 together would.
    jagged = ThroughputProfile((1, 2, 3, 4), (1,), ((1.0,), (1.5,), (2.0,), (2.0,)))
    reqs = [req(0.9, 0.5, 0.95)]
    assert verify_dspark(reqs, jagged, 0, 100).lengths == (1,)
    assert plan_budget_k(reqs, jagged, 0, 100) == 3  # the full search (safe only on old drafts)


def test_dspark_respects_token_budget_and_empty_batch() -> None:
    reqs = [req(0.9, 0.9), req(0.9, 0.9)]
    plan = verify_dspark(reqs, FLAT, prefill_tokens=5, token_budget=8)
    assert plan.batch_tokens == 8 and plan.lengths == (1, 0)  # 5 + 2 base + 1 slot; tie -> request 0
    assert verify_dspark([], FLAT, 3, 8).batch_tokens == 3
    with pytest.raises(ValueError, match="do not fit"):
        verify_dspark(reqs, FLAT, prefill_tokens=7, token_budget=8)


def test_dspark_load_aware_on_profile_file() -> None:
    """On the CPU-like profile the per-request verify length shrinks as the batch grows."""
    profile = ThroughputProfile.load(PROFILE_PATH)
    confidences = (0.95, 0.9, 0.9, 0.85, 0.8, 0.8, 0.75)
    mean_lengths = []
    for num_requests in (1, 4, 16, 64):
        plan = verify_dspark([req(*confidences)] * num_requests, profile, 0, 4096)
        mean_lengths.append(plan.num_verify_tokens / num_requests)
    # a = 0.95, 0.855, 0.77, 0.65, 0.52, 0.42, 0.31: at 64 requests only a > ~0.5 still pays.
    assert mean_lengths == [7, 7, 5, 3]


# ---- dspark-async ---------------------------------------------------------------------------------


def test_async_top_k_ties_by_position() -> None:
    # a: r0 = (1, 1, 0.5), r1 = (1, 0.5). Ranking: (r0,0) (r1,0) (r0,1) (r1,1) (r0,2).
    reqs = [req(1.0, 1.0, 0.5), req(1.0, 0.5)]
    order = [(s.request, s.position) for s in ranked_slots(reqs)]
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
    expected = {0: (0, 0), 1: (1, 0), 2: (1, 1), 3: (2, 1), 4: (2, 2), 5: (3, 2), 9: (3, 2)}
    for k, lengths in expected.items():
        assert verify_dspark_async(reqs, None, 0, 100, k).lengths == lengths


def test_async_saturated_ties_never_displace_prefix() -> None:
    reqs = [req(1.0, 1.0, 1.0), req(1.0)]
    assert verify_dspark_async(reqs, FLAT, 0, 100, 2).lengths == (1, 1)
    assert verify_dspark_async(reqs, FLAT, 0, 5, 9).lengths == (2, 1)  # budget 5 = 2 base + 3 slots


# ---- properties -----------------------------------------------------------------------------------

confidence = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.99999994, 1e-45, 0.5, 0.9]))
verify_request = st.builds(
    lambda c, cap, tpot, time_s, tokens: VerifyRequest(tuple(c), cap, tpot, time_s, tokens),
    st.lists(confidence, max_size=8),
    st.integers(0, 9),
    st.one_of(st.none(), st.floats(0.001, 1.0)),
    st.floats(0, 100),
    st.integers(0, 1000),
)
profiles = st.one_of(
    st.builds(Linear, st.floats(0.001, 1.0), st.floats(0.0, 0.1)),
    st.just(ThroughputProfile.load(PROFILE_PATH)),
    st.just(Steep()),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(verify_request, max_size=10),
    profiles,
    st.integers(0, 40),
    st.integers(0, 60),
    st.integers(0, 80),
)
def test_policy_properties(reqs, profile, prefill, spare, budget_k) -> None:
    budget = prefill + len(reqs) + spare
    ranking = ranked_slots(reqs)
    seen = set()
    for slot in ranking:  # a slot never precedes its own prefix
        assert slot.position == 0 or (slot.request, slot.position - 1) in seen
        seen.add((slot.request, slot.position))
    plans = [
        verify_dspark(reqs, profile, prefill, budget),
        verify_dspark_async(reqs, profile, prefill, budget, budget_k),
    ]
    for plan in plans:
        assert plan.batch_tokens == prefill + len(reqs) + sum(plan.lengths) <= budget
        for r, length in zip(reqs, plan.lengths, strict=True):
            assert 0 <= length <= min(r.max_verify, len(r.confidences))
        # The plan is a prefix of the ranking (admitted in order), hence prefix-closed per request.
        head = ranking[: plan.num_verify_tokens]
        assert tuple(sum(1 for s in head if s.request == r) for r in range(len(reqs))) == plan.lengths
    assert plans[1].num_verify_tokens == min(budget_k, spare, len(ranking))
    fixed = verify_fixed(reqs, 3, prefill, budget)
    assert sum(fixed) <= spare and all(
        0 <= f <= min(3, r.max_verify) for f, r in zip(fixed, reqs, strict=True)
    )
    k = plan_budget_k(reqs, profile, prefill, budget)
    assert 0 <= k <= min(spare, len(ranking))


@settings(max_examples=200, deadline=None)
@given(st.lists(verify_request, max_size=10), st.integers(0, 40))
def test_flat_admits_all_positive_and_steep_admits_none(reqs, prefill) -> None:
    budget = prefill + len(reqs) + 100
    flat = verify_dspark(reqs, FLAT, prefill, budget)
    positive = [sum(1 for a in survival(r.confidences[: r.max_verify]) if a > 0) for r in reqs]
    assert list(flat.lengths) == positive
    assert verify_dspark(reqs, Steep(), prefill, budget).num_verify_tokens == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(confidence, max_size=8), max_size=10), profiles, st.integers(0, 30))
def test_dspark_never_worse_than_no_speculation(confidence_lists, profile, prefill) -> None:
    reqs = [req(*c) for c in confidence_lists]
    budget = prefill + len(reqs) + 200
    plan = verify_dspark(reqs, profile, prefill, budget)
    none = plan_verify(PolicySpec("none"), reqs, profile, prefill, budget)
    if reqs:
        assert plan.theta >= none.theta * (1 - 1e-12)


# ---- fixed / none / dispatch / parsing / budget rule ---------------------------------------------


def test_fixed_and_none() -> None:
    reqs = [req(0.9, 0.9, 0.9), req(0.9, max_verify=1), req()]
    assert verify_none(reqs) == [0, 0, 0]
    assert verify_fixed(reqs, 2) == [2, 1, 0]
    # Budget 3 base + 2 slots: position-major -> everyone's first draft first.
    assert verify_fixed(reqs, 3, prefill_tokens=0, token_budget=5) == [1, 1, 0]
    assert verify_fixed(reqs, 3, prefill_tokens=1, token_budget=5) == [1, 0, 0]


def test_plan_verify_dispatch() -> None:
    reqs = [req(0.9, 0.9), req(0.5, 0.5)]
    none = plan_verify(parse_policy("none"), reqs, None, 4, 100)
    assert (
        none.lengths == (0, 0) and none.expected_tokens == 2 and none.batch_tokens == 6 and none.theta is None
    )
    fixed = plan_verify(parse_policy("fixed:1"), reqs, FLAT, 0, 100)
    assert (
        fixed.lengths == (1, 1)
        and fixed.expected_tokens == pytest.approx(3.4)
        and fixed.theta == pytest.approx(3.4)
    )
    dspark = plan_verify(parse_policy("dspark"), reqs, FLAT, 0, 100)
    assert dspark == verify_dspark(reqs, FLAT, 0, 100)
    assert plan_verify(parse_policy("dspark-async"), reqs, FLAT, 0, 100) == dspark  # no K yet -> dspark
    assert plan_verify(parse_policy("dspark-async"), reqs, FLAT, 0, 100, budget_k=1).lengths == (1, 0)
    with pytest.raises(ValueError, match="needs a throughput profile"):
        plan_verify(parse_policy("dspark"), reqs, None, 0, 100)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("none", PolicySpec("none")),
        (" Fixed:3 ", PolicySpec("fixed", 3)),
        ("dspark", PolicySpec("dspark")),
        ("dspark-async", PolicySpec("dspark-async")),
    ],
)
def test_parse_policy(text: str, spec: PolicySpec) -> None:
    assert parse_policy(text) == spec
    assert parse_policy(str(spec)) == spec


@pytest.mark.parametrize(
    "text", ["", "fixed", "fixed:", "fixed:0", "fixed:-1", "fixed:1.5", "fixed:x", "eagle"]
)
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="verify policy"):
        parse_policy(text)


def test_slo_weight() -> None:
    assert slo_weight(None, 10.0, 0) == 1.0
    assert slo_weight(0.1, 0.95, 10) == 1.0  # on schedule (0.95 s at 95% of 0.1 s/token = 10 tokens)
    assert slo_weight(0.1, 1.9, 10) == pytest.approx(11.0)  # 10 tokens behind
    assert slo_weight(0.1, 1000.0, 0) == SLO_MAX_WEIGHT
    with pytest.raises(ValueError, match="target_tpot_s"):
        VerifyRequest((0.5,), 1, target_tpot_s=0.0)


# ---- per-request SLO: simulation with a fake clock ------------------------------------------------


def simulate(target_tpot_s: float | None, steps: int = 400, num_requests: int = 64, seed: int = 0):
    """Run dspark for ``steps`` steps on the profile file's step-time model (fake clock): every
    request drafts 7 tokens per step with calibrated confidences c ~ U(0.7, 0.95) (acceptance drawn
    with exactly those probabilities). Request 0 carries the goal. Returns (request 0's TPOT in
    seconds, aggregate tokens per second of the others)."""
    profile = ThroughputProfile.load(PROFILE_PATH)
    rng = np.random.default_rng(seed)
    clock, tokens = 0.0, np.zeros(num_requests, dtype=np.int64)
    for _ in range(steps):
        conf = rng.uniform(0.7, 0.95, size=(num_requests, 7))
        reqs = [
            VerifyRequest(tuple(conf[r]), 7, target_tpot_s if r == 0 else None, clock, int(tokens[r]))
            for r in range(num_requests)
        ]
        plan = verify_dspark(reqs, profile, prefill_tokens=0, token_budget=512)
        clock += profile.step_time(plan.batch_tokens, num_requests)
        for r, length in enumerate(plan.lengths):
            accepted = 0
            while accepted < length and rng.random() < conf[r, accepted]:
                accepted += 1
            tokens[r] += accepted + 1
    return clock / tokens[0], tokens[1:].sum() / clock


def test_slo_target_met_where_feasible() -> None:
    baseline_tpot, baseline_rate = simulate(None)
    fastest_tpot, _ = simulate(1e-6)  # infeasible goal: request 0 verifies every draft (weight capped)
    assert fastest_tpot < 0.8 * baseline_tpot  # the goal below is binding yet feasible
    target = (baseline_tpot + fastest_tpot) / 2
    tpot, rate = simulate(target)
    assert tpot <= target
    assert rate >= 0.97 * baseline_rate  # the others barely notice one prioritised request
    # An infeasible goal degrades gracefully: best effort for request 0, others keep most throughput.
    _, rate_infeasible = simulate(fastest_tpot / 2)
    assert rate_infeasible >= 0.9 * baseline_rate


# ---- drafting gate ---------------------------------------------------------------------------------


class WithDrafter:
    """t(B, R) = 1 + 0.01 B + d R seconds, of which the drafter is d R (``draft_time``)."""

    has_draft_time = True

    def __init__(self, per_request_draft_s: float) -> None:
        self.d = per_request_draft_s

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        return 1.0 + 0.01 * num_tokens + self.d * num_requests

    def draft_time(self, num_requests: int, sampled_fraction: float = 0.0) -> float:
        return self.d * num_requests


class WithSampledDrafter(WithDrafter):
    """As WithDrafter, and a sampled request's drafter forward costs 4x a greedy one's."""

    def draft_time(self, num_requests: int, sampled_fraction: float = 0.0) -> float:
        return self.d * num_requests * (1 + 3 * sampled_fraction)


def test_plan_drafting_prices_the_drafter() -> None:
    strong, weak = req(0.9, 0.9, 0.9), req(0.05, 0.05, 0.05)
    # cheap drafter: both strong requests draft
    assert plan_drafting([strong, strong], WithDrafter(0.001), 0, 64) == [True, True]
    # a drafter of 2 s a request on a ~1 s target step: even survival 0.9 (tau ~3.4) does not pay
    # (Theta 3 / 1.03 = 2.9 without drafting vs (3 + 4.88) / 5.09 = 1.5 with the strong two)
    assert plan_drafting([strong, weak, strong], WithDrafter(2.0), 0, 64) == [False, False, False]
    # 0.05 s a request: the strong requests draft (Theta 6.6); adding the weak one's slots
    # (+0.05 expected tokens for 0.05 s of drafter + 0.01 s of verify) lowers Theta to 6.3
    assert plan_drafting([strong, weak, strong], WithDrafter(0.05), 0, 64) == [True, False, True]
    # unknown requests (None) always draft; all-zero confidences never do
    assert plan_drafting([None, req(0.0, 0.0)], WithDrafter(2.0), 0, 64) == [True, False]
    # no measured drafter time: everyone drafts (the gate needs the price)
    assert plan_drafting([weak, weak], FLAT, 0, 64) == [True, True]
    with pytest.raises(ValueError, match="do not fit"):
        plan_drafting([strong] * 3, WithDrafter(0.05), 62, 64)
    # sampled requests draft at a higher cost (here 4x): at 0.4 s a greedy draft the strong pair pays
    # (Theta 3.7 vs 2.0 without drafting), at 1.6 s a sampled one it does not (1.6)
    assert plan_drafting([strong, strong], WithSampledDrafter(0.4), 0, 64, sampled_fraction=0.0) == [True, True]
    assert plan_drafting([strong, strong], WithSampledDrafter(0.4), 0, 64, sampled_fraction=1.0) == [False, False]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=7), min_size=1, max_size=12),
    st.floats(0.0, 0.3),
)
def test_plan_drafting_never_predicts_worse_than_no_drafting(confidence_lists, cost) -> None:
    """Some top-k of the drafted requests' slots has Theta (drafter cost of exactly the drafted
    requests included) above (1 - margin) x Theta with nobody drafting; with margin 0, above it. (The converse, that nobody drafts only when no
    subset would pay, does not hold: the search follows the global slot ranking, see plan_drafting.)"""
    profile = WithDrafter(cost)
    reqs = [req(*c) for c in confidence_lists]
    r = len(reqs)

    def theta(slots, num_drafting: int) -> float:
        return (r + sum(x.weighted for x in slots)) / (profile.step_time(r + len(slots), r) - cost * (r - num_drafting))

    for margin in (0.0, 0.1):
        flags = plan_drafting(reqs, profile, 0, 256, margin=margin)
        drafted = [q for q, f in zip(reqs, flags, strict=True) if f]
        if drafted:
            slots = ranked_slots(drafted)
            assert max(theta(slots[:k], len(drafted)) for k in range(1, len(slots) + 1)) > (1 - margin) * theta([], 0)


def test_hook_drafting_gate_by_policy_and_estimates() -> None:
    """The hook's estimate of a request's next drafts: unknown (the first such request drafts) before any
    drafts exist;
    its own latest confidences blended with the running mean once blocks have been seen; the mean
    alone when its own are stale."""
    from sparkserve.scheduler.policy.controller import (
        ESTIMATE_SHRINKAGE,
        STALE_DRAFT_TOKENS,
        SpeculationController,
    )
    from sparkserve.scheduler.request import DraftState, Request
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.scheduler.speculation import VerifyContext

    def request(rid: str, conf: tuple[float, ...], age: int) -> Request:
        r = Request(rid, [1, 2, 3], SamplingParams(max_tokens=100))
        r.output_token_ids = [5] * 40
        r.drafts = DraftState(last_confidences=conf, last_num_tokens=r.num_tokens - age)
        return r

    ctx = VerifyContext(num_scheduled_tokens=3, num_decode_requests=3, token_budget=64)
    weak = (0.01,) * 4
    reqs = [request("fresh-weak", weak, 1), request("stale-weak", weak, STALE_DRAFT_TOKENS + 1),
            request("never", (), 0)]
    hook = SpeculationController(parse_policy("dspark"), WithDrafter(0.2))
    # no block seen this step (ages > 0): no mean yet; own confidences alone, else unknown, and of the
    # unknown ones only the first drafts (a fresh server learns from one request's drafts, issue 25)
    assert hook.select_drafting(reqs, ctx) == [False, True, False] and hook.last_num_drafting == 1
    assert SpeculationController(parse_policy("fixed:3"), WithDrafter(0.2)).select_drafting(reqs, ctx) == [True] * 3
    assert SpeculationController(parse_policy("none")).select_drafting(reqs, ctx) == [False] * 3
    off = SpeculationController(parse_policy("dspark"), WithDrafter(0.2), gate_drafting=False)
    assert off.select_drafting(reqs, ctx) == [True] * 3
    # a strong block drafted after the previous step (age 0) seeds the running mean: the stale and the
    # never-drafted requests now take the mean (strong: they draft), the fresh weak one the blend (0.48
    # a position: its ~0.9 expected tokens do not pay for 0.2 s of drafter next to three strong ones)
    strong = request("strong", (0.95,) * 4, 0)
    flags = hook.select_drafting([*reqs, strong], VerifyContext(4, 4, 64))
    assert hook._mean_confidences == [0.95] * 4
    blend = ESTIMATE_SHRINKAGE * 0.01 + (1 - ESTIMATE_SHRINKAGE) * 0.95
    assert hook._estimate(reqs[0], hook.clock()).confidences == pytest.approx((blend,) * 4)
    assert hook._estimate(reqs[1], hook.clock()).confidences == (0.95,) * 4
    assert flags == [False, True, True, True]
    # requests that cannot draft are never chosen: penalised ones, and those whose drafts could not be
    # verified before max_tokens (2 tokens left: the next step emits one, draft_cap is then 0)
    penalised = request("pen", (0.95,) * 4, 0)
    penalised.sampling_params = SamplingParams(max_tokens=100, presence_penalty=0.5)
    near_end = request("end", (0.95,) * 4, 0)
    near_end.sampling_params = SamplingParams(max_tokens=42)
    assert hook.select_drafting([strong, penalised, near_end], VerifyContext(3, 3, 64)) == [True, False, False]
    assert hook.last_num_drafting == 1
    # dspark-async: a budget K learned when the policy last ran is dropped in a step where it did not run
    # (nobody held drafts), so it is never applied to a batch of a different size
    async_hook = SpeculationController(parse_policy("dspark-async"), WithDrafter(0.2))
    async_hook._budget_k = 5
    async_hook.select_drafting(reqs, ctx)
    assert async_hook._budget_k is None


def test_prefill_drafting_on_a_fresh_server_is_one_request() -> None:
    """Issue 25: c requests finishing their prefill together on a fresh server do not all draft (each
    drafter row costs before anything is known): only the first, and none when a decode request already
    drafts to learn; once confidences are known, all of them or none as the gate did."""
    from sparkserve.scheduler.policy.controller import SpeculationController
    from sparkserve.scheduler.request import DraftState, Request
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.scheduler.speculation import VerifyContext

    hook = SpeculationController(parse_policy("dspark"), WithDrafter(0.2))
    assert hook.drafts_after_prefill(16) == [True] + [False] * 15
    unknown = Request("u", [1, 2, 3], SamplingParams(max_tokens=100))
    assert hook.select_drafting([unknown], VerifyContext(17, 1, 64)) == [True]
    assert hook.drafts_after_prefill(3) == [False] * 3  # the decode request learns
    strong = Request("s", [1, 2, 3], SamplingParams(max_tokens=100))
    strong.drafts = DraftState(last_confidences=(0.95,) * 4, last_num_tokens=strong.num_tokens)
    assert hook.select_drafting([strong], VerifyContext(1, 1, 64)) == [True]
    assert hook.drafts_after_prefill(2) == [True, True]
    hook.last_num_drafting = 0
    assert hook.drafts_after_prefill(2) == [False, False]
    assert SpeculationController(parse_policy("fixed:3"), WithDrafter(0.2)).drafts_after_prefill(2) == [True, True]
    assert SpeculationController(parse_policy("none")).drafts_after_prefill(2) == [False, False]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from([0.0, 0.3, 0.6, 0.9, 0.99, 1.0]), min_size=1, max_size=7), min_size=1, max_size=8),
    st.sampled_from([0.0, 0.0005, 0.001, 0.002, 0.004, 0.008]),  # drafter s per request, steps ~20-40 ms
    st.sampled_from([0.0, 0.5, 1.0]),
    st.integers(0, 12),
)
def test_gate_early_exit_on_a_monotone_profile_is_the_full_search(confidence_lists, cost, fraction, prefill) -> None:
    """``plan_drafting`` and ``plan_budget_k`` stop early on a ``ThroughputProfile`` (monotone by construction,
    issue 25: the gate's cost where nobody drafts); their choice must be the full search's, which runs
    when the profile is wrapped in a model the planner cannot tell is monotone."""
    base = ThroughputProfile.load(PROFILE_PATH)
    profile = ThroughputProfile(base.batch_tokens, base.num_requests, base.step_time_s, base.key,
                                tuple(cost * r for r in base.num_requests), tuple(4 * cost * r for r in base.num_requests))

    class Opaque:  # the same times, not recognisably monotone: the planner searches every slot
        has_draft_time = True
        step_time = staticmethod(profile.step_time)
        draft_time = staticmethod(profile.draft_time)

    reqs = [req(*c) for c in confidence_lists]
    assert (plan_drafting(reqs, profile, prefill, 512, fraction)
            == plan_drafting(reqs, Opaque(), prefill, 512, fraction))
    assert plan_budget_k(reqs, profile, prefill, 512) == plan_budget_k(reqs, Opaque(), prefill, 512)
