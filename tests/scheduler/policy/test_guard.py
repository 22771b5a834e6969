"""The speculation guard (``scheduler/policy/guard.py``) and the conservative policy of issue 25 in
simulated runs of the real scheduler and controller (``sparkserve.testing.spec_sim``)."""

from __future__ import annotations

import random

import pytest

from sparkserve.scheduler.policy.acceptance import RequestAcceptance
from sparkserve.scheduler.policy.calibration import OnlineCalibration, conservative_calibration
from sparkserve.scheduler.policy.controller import SpeculationController
from sparkserve.scheduler.policy.guard import SpeculationGuard
from sparkserve.scheduler.policy.spec import parse_policy
from sparkserve.scheduler.profile.online import OnlineProfile
from sparkserve.testing.spec_sim import SimMachine, machine_profile, simulate


def _losing_step(guard: SpeculationGuard) -> None:
    """R = 4: 5 tokens in 40 ms where a plain step is predicted 20 ms (4 tokens): speedup 0.625."""
    guard.observe(4, 5, 8, 0.040, 0.020)


def _winning_step(guard: SpeculationGuard) -> None:
    guard.observe(4, 10, 8, 0.030, 0.020)


def test_guard_backs_off_after_a_losing_window_then_probes() -> None:
    guard = SpeculationGuard(min_window=4, max_window=8, z=0.0, backoff_steps=3)
    guard.observe(4, 4, 0, 0.020, 0.020)  # a plain step: the reference is measured (scale 1)
    for _ in range(3):
        _losing_step(guard)
        assert guard.speculating
    _losing_step(guard)
    assert guard.backing_off and not guard.speculating and guard.num_backoffs == 1
    assert guard.last_speedup == pytest.approx(0.625)
    for _ in range(3):
        guard.observe(4, 4, 0, 0.020, 0.020)
    assert guard.speculating  # probe
    for _ in range(4):
        _losing_step(guard)
    assert guard.backing_off and guard.num_backoffs == 2
    for _ in range(5):  # the second back-off is twice as long
        guard.observe(4, 4, 0, 0.020, 0.020)
        assert guard.backing_off
    guard.observe(4, 4, 0, 0.020, 0.020)
    assert guard.speculating


def test_guard_keeps_verifying_when_speculation_wins() -> None:
    guard = SpeculationGuard(min_window=4, max_window=8, backoff_steps=3)
    guard.observe(4, 4, 0, 0.020, 0.020)
    for _ in range(40):
        _winning_step(guard)
        assert guard.speculating
    assert guard.num_backoffs == 0 and guard.last_speedup == pytest.approx(10 / 4 * 0.020 / 0.030)


def test_guard_waits_for_evidence_near_break_even() -> None:
    """Noisy steps around 1.0x: the sequential test keeps the window open until ``max_window``."""
    guard = SpeculationGuard(min_window=4, max_window=12, z=2.0)
    guard.observe(4, 4, 0, 0.020, 0.020)
    for i in range(11):
        guard.observe(4, 8 if i % 2 else 4, 8, 0.030, 0.020)  # 1.33x and 0.67x alternately
        assert guard.last_speedup is None
    guard.observe(4, 9, 8, 0.030, 0.020)
    assert guard.last_speedup == pytest.approx(73 / 72) and guard.speculating


def test_guard_counts_drafting_steps_as_speculation() -> None:
    """A step that only ran the drafter (nothing verified) costs speculation time: it is no plain step."""
    guard = SpeculationGuard(min_window=4, max_window=4, backoff_steps=3)
    guard.observe(4, 4, 0, 0.020, 0.020)
    for _ in range(4):
        guard.observe(4, 4, 0, 0.030, 0.020, num_drafting=4)
    assert guard.backing_off and guard.plain_scale == pytest.approx(1.0)


def test_guard_measures_a_plain_reference_before_judging() -> None:
    """No plain step seen: the window stays open and plain steps are probed; a profile whose plain
    prediction is twice too slow is corrected by them (speculation that looked good is not)."""
    guard = SpeculationGuard(min_window=2, max_window=2, backoff_steps=3, plain_probe_steps=2)
    guard.observe(4, 5, 8, 0.030, 0.040)  # looks like 1.67x against the profile's 40 ms plain step
    guard.observe(4, 5, 8, 0.030, 0.040)
    assert not guard.speculating and not guard.backing_off  # a plain probe
    guard.observe(4, 4, 0, 0.020, 0.040)
    guard.observe(4, 4, 0, 0.020, 0.040)
    assert guard.speculating and guard.plain_scale == pytest.approx(0.5, rel=0.1)
    guard.observe(4, 5, 8, 0.030, 0.040)
    assert guard.backing_off  # 5 tokens in 30 ms against 4 in 20 ms: 0.83x


def test_guard_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        SpeculationGuard(min_window=1)
    with pytest.raises(ValueError):
        SpeculationGuard().observe(4, 4, 0, 0.0, 0.02)


def _controller(profile, conservative: bool = True, guard: bool = True, acceptance: bool = True) -> SpeculationController:
    calibration = conservative_calibration() if conservative else OnlineCalibration()
    return SpeculationController(parse_policy("dspark"), OnlineProfile(profile), num_lookahead_tokens=4,
                                 calibration=calibration, guard=SpeculationGuard() if guard else None,
                                 acceptance=RequestAcceptance() if acceptance else None)


def _drafts(stated: float, true: float):
    def propose(rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (stated,) * 4, (true,) * 4
    return propose


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_profile_twice_too_optimistic_about_verify_rows_still_keeps_the_promise(concurrency: int) -> None:
    """The profile prices verify rows at half their true cost (4 ms a row, a fifth of a plain step, and a
    3 ms drafter per request): speculation still ends at >= 0.98x plain decoding in tokens per second,
    with the online correction (profile, guard) doing its work."""
    machine = SimMachine(fixed_s=0.02, row_s=0.001, verify_row_s=0.004, draft_s=0.003)
    profile = machine_profile(machine, optimism=2.0)
    n = 2 * concurrency + 4
    plain = simulate(None, machine, _drafts(0.6, 0.55), n, concurrency)
    spec = simulate(_controller(profile), machine, _drafts(0.6, 0.55), n, concurrency)
    assert spec.tokens == plain.tokens
    assert spec.tokens_per_s >= 0.98 * plain.tokens_per_s, (spec, plain)


def test_good_drafts_keep_their_gain_at_low_load() -> None:
    """Where drafts are good (true 0.9) speculation keeps verifying and wins clearly at c = 1."""
    machine = SimMachine(fixed_s=0.02, row_s=0.001, verify_row_s=0.001, draft_s=0.002)
    profile = machine_profile(machine)
    controller = _controller(profile)
    plain = simulate(None, machine, _drafts(0.9, 0.9), 4, 1)
    spec = simulate(controller, machine, _drafts(0.9, 0.9), 4, 1)
    assert spec.tokens_per_s >= 1.5 * plain.tokens_per_s
    assert controller.guard.num_backoffs == 0 and spec.verify_tokens > 0


# Verify rows at half a plain step each: verifying 4 drafts costs 2.9x a plain step at c = 1, so only
# drafts near their true 0.9 survival pay; the drafter states 0.6 (under-confident), the conservative
# calibration makes that 0.48.
EXPENSIVE_VERIFY = SimMachine(fixed_s=0.02, row_s=0.001, verify_row_s=0.01, draft_s=0.002)


def test_good_drafts_earn_their_verification_fast() -> None:
    """Issue 25: a request whose drafts verify well earns its verification within 16 steps through its own
    acceptance ratio and probes, and ends >= 1.15x plain decoding; without them (the calibration table
    alone) it never verifies two drafts in a step and stays at 1.0x."""
    plain = simulate(None, EXPENSIVE_VERIFY, _drafts(0.6, 0.9), 4, 1)
    spec = simulate(_controller(machine_profile(EXPENSIVE_VERIFY)), EXPENSIVE_VERIFY, _drafts(0.6, 0.9), 4, 1)
    table_only = simulate(_controller(machine_profile(EXPENSIVE_VERIFY), acceptance=False), EXPENSIVE_VERIFY,
                          _drafts(0.6, 0.9), 4, 1)
    assert spec.first_multi_verify_step is not None and spec.first_multi_verify_step < 16, spec
    assert spec.tokens_per_s >= 1.15 * plain.tokens_per_s, (spec, plain)
    assert table_only.first_multi_verify_step is None and table_only.tokens_per_s < 1.02 * plain.tokens_per_s


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_losing_drafts_still_back_off_with_probes(concurrency: int) -> None:
    """An over-confident drafter (states 0.9, true 0.3): probes and per-request ratios do not make it
    verify more than the table alone would, and speculation stays >= 0.97x plain (the guard backs off
    where it verified)."""
    n = 2 * concurrency + 4
    plain = simulate(None, EXPENSIVE_VERIFY, _drafts(0.9, 0.3), n, concurrency)
    controller = _controller(machine_profile(EXPENSIVE_VERIFY))
    spec = simulate(controller, EXPENSIVE_VERIFY, _drafts(0.9, 0.3), n, concurrency)
    table_only = simulate(_controller(machine_profile(EXPENSIVE_VERIFY), acceptance=False), EXPENSIVE_VERIFY,
                          _drafts(0.9, 0.3), n, concurrency)
    assert spec.verify_tokens <= max(table_only.verify_tokens, 2 * concurrency)
    assert spec.tokens_per_s >= 0.97 * plain.tokens_per_s, (spec, plain)
    if spec.verify_tokens > 8:
        assert controller.guard.num_backoffs > 0


def test_request_acceptance_ratio_and_probes() -> None:
    acc = RequestAcceptance(prior_weight=2.0, uncertainty_z=0.0, probe_drafts=2, probe_positions=4, max_probes=2)
    assert acc.ratio("r") == 1.0 and acc.correct("r", (0.5, 0.4)) == (0.5, 0.4)
    assert acc.probing("r") and acc.probe_length("r", 4) == 2 and acc.probe_length("r", 1) == 1
    acc.observe("r", (0.5, 0.5, 0.5), num_verified=3, num_accepted=3)  # 3 reached, all accepted
    assert acc.ratio("r") == pytest.approx((3 + 2) / (1.5 + 2))
    assert acc.correct("r", (0.9,)) == (0.99,)  # capped: a ratio never claims certainty
    acc.observe("r", (0.5, 0.5), num_verified=2, num_accepted=0)  # 1 reached, rejected
    assert acc.ratio("r") == pytest.approx((3 + 2) / (2.0 + 2)) and not acc.probing("r")
    assert acc.probe_length("r", 4) == 0
    lower = RequestAcceptance(uncertainty_z=1.0)
    lower.observe("r", (0.5,), 1, 1)
    assert lower.ratio("r") == pytest.approx((1 + 2) / 2.5 - (0.25 + 0.5) ** 0.5 / 2.5)
    acc.release("r")
    assert acc.num_tracked_requests == 0
    with pytest.raises(ValueError):
        RequestAcceptance(prior_weight=0.0)
