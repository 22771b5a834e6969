"""Unit tests of server/metrics.py, fed by a fake engine (no model, no HTTP)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sparkserve.engine.outputs import EngineStats, StepStats
from sparkserve.scheduler.policy.controller import ControllerStats
from sparkserve.scheduler.profile.grid import ThroughputProfile
from sparkserve.scheduler.stats import DraftOutcome, SchedulerStats, SpecDecodingStats
from sparkserve.server.metrics import FINISHED_REASONS, REJECT_REASONS, ServerMetrics
from sparkserve.server.metrics_glue import EngineMetricsListener, build_metrics, publish_profile

MODEL = "smollm2-135m"
GAMMA = 4


def spec(verified: list[int], accepted: list[int], gamma: int = GAMMA) -> SpecDecodingStats:
    """A step record of decode requests with these l_r and accepted counts (ValueError if inconsistent)."""
    drafts = [DraftOutcome(f"r{i}", "dspark", v, a) for i, (v, a) in enumerate(zip(verified, accepted, strict=True))]
    return SpecDecodingStats.of(gamma, drafts)


def value(m: ServerMetrics, name: str, **labels: str) -> float:
    """A sample's value; fails (rather than returning None) when the series does not exist."""
    got = m.registry.get_sample_value(name, {"model_name": m.model_name, **labels})
    assert got is not None, f"series {name}{labels} missing"
    return got


def rendered_series(m: ServerMetrics) -> dict[tuple[str, tuple], float]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_label_sets_exist_at_zero_from_start_up() -> None:
    m = ServerMetrics(MODEL, num_speculative_tokens=GAMMA)
    series = rendered_series(m)
    for reason in FINISHED_REASONS:
        key = ("sparkserve:request_success_total", (("finished_reason", reason), ("model_name", MODEL)))
        assert series[key] == 0
    for reason in REJECT_REASONS:
        assert value(m, "sparkserve:request_rejected_total", reason=reason) == 0
    for k in range(GAMMA):
        assert value(m, "sparkserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(k)) == 0
        assert value(m, "sparkserve:spec_decode_num_verified_tokens_per_pos_total", position=str(k)) == 0
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(m, f"sparkserve:{name}") == 0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert value(m, f"sparkserve:{name}_count") == 0
    # Every series carries the model_name label, as vLLM's do.
    assert all(dict(labels).get("model_name") == MODEL for _, labels in series)


ISSUE_NAMES = """num_requests_running num_requests_waiting kv_cache_usage_perc prompt_tokens_total
generation_tokens_total request_success_total num_preemptions_total time_to_first_token_seconds_count
inter_token_latency_seconds_count request_time_per_output_token_seconds_count e2e_request_latency_seconds_count
request_queue_time_seconds_count request_prefill_time_seconds_count request_decode_time_seconds_count
spec_decode_num_drafts_total spec_decode_num_draft_tokens_total spec_decode_num_accepted_tokens_total
spec_decode_num_accepted_tokens_per_pos_total spec_decode_num_verified_tokens_per_pos_total
spec_decode_verify_budget_tokens_count spec_decode_verified_tokens_per_request_count""".split()


def test_names_follow_vllm_v1() -> None:
    """The names the issue lists (vLLM v1's with ``sparkserve:`` for ``vllm:``) are all exported."""
    exported = {name for name, _ in rendered_series(ServerMetrics(MODEL, GAMMA))}
    assert {f"sparkserve:{n}" for n in ISSUE_NAMES} <= exported


def test_registries_are_independent() -> None:
    a, b = ServerMetrics("a", 2), ServerMetrics("b", 2)
    a.on_generation_tokens(5)
    assert value(a, "sparkserve:generation_tokens_total") == 5
    assert value(b, "sparkserve:generation_tokens_total") == 0


def test_request_latencies_hand_computed() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    # arrival 10.0, scheduled 10.5, events at 11.0 (first token), 11.2 (3 tokens), 11.5 (2 tokens).
    m.on_request_finished(
        finished_reason="length",
        num_prompt_tokens=7,
        num_generation_tokens=6,
        arrival_time=10.0,
        queued_time=10.0,
        first_scheduled_time=10.5,
        token_event_times=[11.0, 11.2, 11.5],
        finished_time=11.5,
    )
    assert value(m, "sparkserve:request_success_total", finished_reason="length") == 1
    assert value(m, "sparkserve:time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert value(m, "sparkserve:e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    assert value(m, "sparkserve:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "sparkserve:request_prefill_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "sparkserve:request_decode_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "sparkserve:request_inference_time_seconds_sum") == pytest.approx(1.0)
    # ITL: one observation per gap between events (two gaps), not per token.
    assert value(m, "sparkserve:inter_token_latency_seconds_count") == 2
    assert value(m, "sparkserve:inter_token_latency_seconds_sum") == pytest.approx(0.5)
    # TPOT = (e2e - TTFT) / (tokens - 1) = 0.5 / 5.
    assert value(m, "sparkserve:request_time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert value(m, "sparkserve:request_prompt_tokens_sum") == 7
    assert value(m, "sparkserve:request_generation_tokens_sum") == 6
    # 0.2 s and 0.3 s gaps: both <= 0.5, none <= 0.1.
    assert value(m, "sparkserve:inter_token_latency_seconds_bucket", le="0.5") == 2
    assert value(m, "sparkserve:inter_token_latency_seconds_bucket", le="0.1") == 0


def test_request_without_tokens_or_scheduling() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    m.on_request_finished(
        finished_reason="abort",
        num_prompt_tokens=3,
        num_generation_tokens=0,
        arrival_time=1.0,
        finished_time=4.0,
    )
    assert value(m, "sparkserve:request_success_total", finished_reason="abort") == 1
    assert value(m, "sparkserve:e2e_request_latency_seconds_sum") == 3.0
    for name in (
        "time_to_first_token_seconds",
        "request_queue_time_seconds",
        "request_time_per_output_token_seconds",
    ):
        assert value(m, f"sparkserve:{name}_count") == 0


def test_single_token_request_has_no_tpot_or_itl() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    m.on_request_finished(
        finished_reason="length",
        num_prompt_tokens=3,
        num_generation_tokens=1,
        arrival_time=0.0,
        first_scheduled_time=0.0,
        token_event_times=[0.2],
        finished_time=0.2,
    )
    assert value(m, "sparkserve:time_to_first_token_seconds_count") == 1
    assert value(m, "sparkserve:inter_token_latency_seconds_count") == 0
    assert value(m, "sparkserve:request_time_per_output_token_seconds_count") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"finished_reason": "timeout"},
        {"token_event_times": [2.0, 1.5]},
        {"first_scheduled_time": 0.5},  # before arrival
        {"finished_time": 1.5},  # before the last event
        {"queued_time": 3.5},  # queued after it was scheduled
    ],
)
def test_request_finished_rejects_bad_input(kwargs: dict) -> None:
    args = dict(
        finished_reason="stop",
        num_prompt_tokens=1,
        num_generation_tokens=2,
        arrival_time=1.0,
        first_scheduled_time=1.0,
        token_event_times=[2.0, 3.0],
        finished_time=3.0,
    )
    args.update(kwargs)
    m = ServerMetrics(MODEL, GAMMA)
    with pytest.raises(ValueError):
        m.on_request_finished(**args)
    assert value(m, "sparkserve:e2e_request_latency_seconds_count") == 0


def test_step_gauges_preemptions_and_batch_tokens() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    m.on_step(num_running=3, num_waiting=5, kv_cache_usage=0.25, num_preemptions=2, num_batched_tokens=40)
    m.on_step(num_running=1, num_waiting=0, kv_cache_usage=0.75, num_preemptions=1, num_batched_tokens=0)
    assert value(m, "sparkserve:num_requests_running") == 1
    assert value(m, "sparkserve:num_requests_waiting") == 0
    assert value(m, "sparkserve:kv_cache_usage_perc") == 0.75
    assert value(m, "sparkserve:num_preemptions_total") == 3
    assert value(m, "sparkserve:iteration_tokens_total_count") == 1  # empty steps are not observed
    assert value(m, "sparkserve:iteration_tokens_total_sum") == 40
    with pytest.raises(ValueError):
        m.on_step(num_running=0, num_waiting=0, kv_cache_usage=1.5)


def test_spec_counters_by_position() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    # Three decode requests: verify 4 accept 2, verify 1 accept 1, verify 0 (policy skipped them).
    m.on_step(
        num_running=3,
        num_waiting=0,
        kv_cache_usage=0.1,
        num_batched_tokens=8,
        spec_decoding=spec([4, 1, 0], [2, 1, 0]),
    )
    assert value(m, "sparkserve:spec_decode_num_drafts_total") == 3
    assert value(m, "sparkserve:spec_decode_num_draft_tokens_total") == 5
    assert value(m, "sparkserve:spec_decode_num_accepted_tokens_total") == 3
    verified = [
        value(m, "sparkserve:spec_decode_num_verified_tokens_per_pos_total", position=str(k))
        for k in range(4)
    ]
    accepted = [
        value(m, "sparkserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(k))
        for k in range(4)
    ]
    assert verified == [2, 1, 1, 1]
    assert accepted == [2, 1, 0, 0]
    assert value(m, "sparkserve:spec_decode_verify_budget_tokens_sum") == 5
    assert value(m, "sparkserve:spec_decode_verify_budget_tokens_count") == 1
    assert value(m, "sparkserve:spec_decode_verified_tokens_per_request_count") == 3
    assert value(m, "sparkserve:spec_decode_verified_tokens_per_request_bucket", le="0.0") == 1


@pytest.mark.parametrize("verified, accepted, gamma",
                         [([2], [3], GAMMA), ([5], [0], GAMMA), ([1, 2], [1], GAMMA), ([-1], [0], GAMMA),
                          ([1], [1], GAMMA + 1)])
def test_spec_counters_reject_inconsistent_input(verified: list[int], accepted: list[int], gamma: int) -> None:
    """An inconsistent record cannot be made; one for another gamma is refused by the metrics."""
    m = ServerMetrics(MODEL, GAMMA)
    with pytest.raises(ValueError):
        m.on_step(
            num_running=1,
            num_waiting=0,
            kv_cache_usage=0.0,
            spec_decoding=spec(verified, accepted, gamma),
        )
    assert value(m, "sparkserve:spec_decode_num_drafts_total") == 0


@settings(deadline=None)
@given(
    st.lists(
        st.lists(
            st.integers(0, GAMMA).flatmap(lambda v: st.tuples(st.just(v), st.integers(0, v))), max_size=8
        ),
        max_size=6,
    )
)
def test_spec_position_counters_sum_to_totals(steps: list[list[tuple[int, int]]]) -> None:
    m = ServerMetrics(MODEL, GAMMA)
    for pairs in steps:
        m.on_step(
            num_running=len(pairs),
            num_waiting=0,
            kv_cache_usage=0.0,
            spec_decoding=spec([v for v, _ in pairs], [a for _, a in pairs]),
        )
    per_pos = "sparkserve:spec_decode_num_{}_tokens_per_pos_total"
    verified = [value(m, per_pos.format("verified"), position=str(k)) for k in range(GAMMA)]
    accepted = [value(m, per_pos.format("accepted"), position=str(k)) for k in range(GAMMA)]
    assert sum(verified) == value(m, "sparkserve:spec_decode_num_draft_tokens_total")
    assert sum(accepted) == value(m, "sparkserve:spec_decode_num_accepted_tokens_total")
    # A position is verified / accepted only if the one before it is: both curves are non-increasing.
    assert verified == sorted(verified, reverse=True) and accepted == sorted(accepted, reverse=True)
    assert all(a <= v for a, v in zip(accepted, verified, strict=True))


def test_profile_gauge_replaced_on_update() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    m.set_profile([16, 64], [1, 8], [[0.01, 0.02], [0.02, 0.04]])
    assert value(m, "sparkserve:profile_steps_per_second", batch_tokens="64", num_requests="8") == 25.0
    assert value(m, "sparkserve:profile_steps_per_second", batch_tokens="16", num_requests="1") == 100.0
    m.set_profile([32], [4], [[0.05]])
    assert value(m, "sparkserve:profile_steps_per_second", batch_tokens="32", num_requests="4") == 20.0
    old = {"model_name": MODEL, "batch_tokens": "64", "num_requests": "8"}
    assert m.registry.get_sample_value("sparkserve:profile_steps_per_second", old) is None
    with pytest.raises(ValueError):
        m.set_profile([1, 2], [1], [[0.1]])
    with pytest.raises(ValueError):
        m.set_profile([1], [1], [[0.0]])


def test_rejections_counted_by_reason() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    m.on_request_rejected("queue_full")
    m.on_request_rejected("queue_full")
    m.on_request_rejected("draining")
    assert value(m, "sparkserve:request_rejected_total", reason="queue_full") == 2
    assert value(m, "sparkserve:request_rejected_total", reason="draining") == 1
    with pytest.raises(ValueError):
        m.on_request_rejected("teapot")


# ---- a fake engine: N requests through a speculative decode loop on a fake clock -------------------


@dataclass
class FakeRequest:
    prompt_len: int
    max_tokens: int
    arrival: float
    scheduled: float | None = None
    events: list[float] = field(default_factory=list)
    generated: int = 0


def run_fake_engine(m: ServerMetrics, n: int, seed: int = 0) -> tuple[list[FakeRequest], int, int]:
    """Admit n requests at once, run at most 3 at a time, decode with random verify/accept lengths.

    Returns the requests, and the total verified and accepted drafts the fake sampler produced.
    """
    rng = random.Random(seed)
    now = 0.0
    waiting = [FakeRequest(rng.randint(3, 50), rng.randint(1, 20), arrival=now) for _ in range(n)]
    requests, running = list(waiting), []
    total_verified = total_accepted = 0
    while waiting or running:
        now += 0.01
        while waiting and len(running) < 3:
            req = waiting.pop(0)
            req.scheduled = now
            running.append(req)
        verified, accepted = [], []
        for req in running:
            if req.events:  # a decode step with drafts: verify l, accept a <= l, emit a + 1
                v = rng.randint(0, GAMMA)
                a = rng.randint(0, v)
                verified.append(v)
                accepted.append(a)
                emitted = min(a + 1, req.max_tokens - req.generated)
            else:  # the prefill step emits the first token
                emitted = 1
                m.on_prompt_tokens(req.prompt_len)
            req.generated += emitted
            req.events.append(now)
            m.on_generation_tokens(emitted)
        total_verified, total_accepted = total_verified + sum(verified), total_accepted + sum(accepted)
        finished = [r for r in running if r.generated >= r.max_tokens]
        running = [r for r in running if r.generated < r.max_tokens]
        m.on_step(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_cache_usage=len(running) / 3,
            num_batched_tokens=sum(1 + v for v in verified) + 10,
            spec_decoding=spec(verified, accepted),
        )
        for req in finished:
            m.on_request_finished(
                finished_reason="length",
                num_prompt_tokens=req.prompt_len,
                num_generation_tokens=req.generated,
                arrival_time=req.arrival,
                first_scheduled_time=req.scheduled,
                token_event_times=req.events,
                finished_time=now,
            )
    return requests, total_verified, total_accepted


def test_counters_after_n_known_requests_match_usage() -> None:
    n = 25
    m = ServerMetrics(MODEL, GAMMA)
    requests, verified, accepted = run_fake_engine(m, n)
    assert value(m, "sparkserve:request_success_total", finished_reason="length") == n
    assert sum(value(m, "sparkserve:request_success_total", finished_reason=r) for r in FINISHED_REASONS) == n
    assert value(m, "sparkserve:prompt_tokens_total") == sum(r.prompt_len for r in requests)
    assert value(m, "sparkserve:generation_tokens_total") == sum(r.max_tokens for r in requests)
    assert value(m, "sparkserve:request_generation_tokens_sum") == sum(r.max_tokens for r in requests)
    assert value(m, "sparkserve:e2e_request_latency_seconds_count") == n
    assert value(m, "sparkserve:time_to_first_token_seconds_count") == n
    assert value(m, "sparkserve:inter_token_latency_seconds_count") == sum(
        len(r.events) - 1 for r in requests
    )
    assert value(m, "sparkserve:spec_decode_num_draft_tokens_total") == verified
    assert value(m, "sparkserve:spec_decode_num_accepted_tokens_total") == accepted
    assert value(m, "sparkserve:num_requests_running") == 0
    # Queued requests waited for a slot: the queue time histogram saw a positive total.
    assert value(m, "sparkserve:request_queue_time_seconds_sum") > 0


# ---- server/metrics_glue.py: the engine step listener, with a fake core ----------------------------


def step_stats(verified: list[int] = [3, 1], accepted: list[int] = [2, 0], gamma: int = GAMMA,  # noqa: B006
               **kw) -> StepStats:
    defaults = dict(num_batched_tokens=20, num_preemptions=1, num_decode_requests=3, num_drafting=1)
    record = spec(verified, accepted, gamma) if gamma else None
    return StepStats(SchedulerStats(**{**defaults, **kw}, spec_decoding=record))


def profile(seconds: float) -> ThroughputProfile:
    return ThroughputProfile((16, 64), (1, 4), ((seconds, seconds), (seconds, seconds)), {})


def controller_stats(seconds: float | None) -> ControllerStats:
    return ControllerStats("dspark", None, None, None, None, None if seconds is None else profile(seconds), 0)


@dataclass
class FakeEngine:
    """An engine (``StatsEngine``) whose ``stats()`` is built from plain fields (no torch)."""

    num_running: int = 2
    num_waiting: int = 1
    kv_cache_usage: float = 0.25
    gamma: int = 0
    profile_seconds: float | None = None
    model_name: str = MODEL
    max_model_len: int = 512
    step_listeners: list = field(default_factory=list)

    def stats(self, step: StepStats | None = None) -> EngineStats:
        controller = controller_stats(self.profile_seconds) if self.gamma else None
        return EngineStats(self.num_running, self.num_waiting, self.kv_cache_usage, step, self.gamma, controller)


def test_step_listener_records_each_step_once() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    engine = FakeEngine()
    listener = EngineMetricsListener(m)
    listener(engine.stats(step_stats()), [])
    listener(engine.stats(None), [])  # no step ran (aborts only, an empty step): gauges only
    assert value(m, "sparkserve:num_preemptions_total") == 1
    assert value(m, "sparkserve:iteration_tokens_total_count") == 1
    assert value(m, "sparkserve:spec_decode_num_draft_tokens_total") == 4
    assert value(m, "sparkserve:spec_decode_num_accepted_tokens_per_pos_total", position="1") == 1
    assert value(m, "sparkserve:num_requests_running") == 2
    assert value(m, "sparkserve:kv_cache_usage_perc") == 0.25
    engine.num_running = 0
    listener(engine.stats(step_stats(gamma=0, num_preemptions=0)), [])
    assert value(m, "sparkserve:iteration_tokens_total_count") == 2
    assert value(m, "sparkserve:num_requests_running") == 0
    assert listener.num_steps == 3
    assert value(m, "sparkserve:spec_decode_num_drafter_runs_total") == 0  # no drafter loaded
    engine.gamma = GAMMA
    listener(engine.stats(step_stats()), [])
    assert value(m, "sparkserve:spec_decode_num_drafter_runs_total") == 1
    assert value(m, "sparkserve:spec_decode_num_drafter_skips_total") == 2


def test_step_listener_never_raises() -> None:
    m = ServerMetrics(MODEL, GAMMA)
    bad = FakeEngine(gamma=GAMMA).stats(step_stats(gamma=GAMMA + 1))  # a record for another gamma
    EngineMetricsListener(m)(bad, [])  # logged, not raised: it runs inside the engine loop
    assert value(m, "sparkserve:spec_decode_num_drafts_total") == 0


def test_profile_published_at_start_and_refreshed() -> None:
    engine = FakeEngine(gamma=GAMMA, profile_seconds=0.02)
    metrics = build_metrics(engine, 256, profile_every=3)
    assert metrics.num_speculative_tokens == GAMMA and len(engine.step_listeners) == 1
    sps = ("sparkserve:profile_steps_per_second", {"batch_tokens": "64", "num_requests": "4"})
    assert metrics.registry.get_sample_value(sps[0], {"model_name": MODEL, **sps[1]}) == pytest.approx(50)
    engine.profile_seconds = 0.04  # the online profile drifted
    for _ in range(2):
        engine.step_listeners[0](engine.stats(step_stats()), [])
    assert metrics.registry.get_sample_value(sps[0], {"model_name": MODEL, **sps[1]}) == pytest.approx(50)
    engine.step_listeners[0](engine.stats(step_stats()), [])  # the 3rd step republishes
    assert metrics.registry.get_sample_value(sps[0], {"model_name": MODEL, **sps[1]}) == pytest.approx(25)


def test_no_drafter_no_profile() -> None:
    engine = FakeEngine()
    assert engine.stats().num_speculative_tokens == 0
    assert not publish_profile(ServerMetrics(MODEL), engine.stats())
    assert not publish_profile(ServerMetrics(MODEL), FakeEngine(gamma=GAMMA).stats())


def test_spec_decode_backoff_follows_the_guard() -> None:
    """``sparkserve:spec_decode_backoff`` is 1 while the guard holds speculation off, 0 otherwise."""
    from sparkserve.scheduler.policy.guard import GuardStats

    m = ServerMetrics(MODEL, GAMMA)
    listener = EngineMetricsListener(m, profile_every=1000)
    step = StepStats(SchedulerStats(num_batched_tokens=4, num_decode_requests=4, spec_decoding=spec([0], [0])))
    for backing_off, expected in ((True, 1.0), (False, 0.0)):
        controller = ControllerStats("dspark", None, None, None, 0, None, 0,
                                     guard=GuardStats(backing_off, 1, 0.8, 1.0))
        listener(EngineStats(4, 0, 0.1, step, GAMMA, controller))
        assert value(m, "sparkserve:spec_decode_backoff") == expected
