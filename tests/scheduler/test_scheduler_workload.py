"""Hypothesis-driven random workloads against the scheduler's invariants.

Random prompt lengths, max_tokens, arrival steps, aborts (also while a step is in flight), and a fake
runner that accepts a random prefix of the drafts, emits EOS now and then and proposes random drafts.
After every schedule and every update: the token budget and ``max_num_seqs`` hold, every scheduled seq
matches its request's state, the oldest running request is never preempted and always scheduled, the
partial-prefill limits hold, block accounting is exact; at the end every block is free.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.scheduler.config import SchedulerConfig
from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.scheduler.outputs import DraftProposal, RunnerOutput, SchedulerOutput, TokenLogprob
from sparkserve.scheduler.request import Request, RequestStatus
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.scheduler.stats import SchedulerStats
from sparkserve.testing.scheduler_helpers import EOS, TableMirror, make_request

_MAX_STEPS = 3000


@st.composite
def configs(draw: st.DrawFn) -> SchedulerConfig:
    max_num_seqs = draw(st.integers(1, 4))
    max_partial = draw(st.integers(1, 3))
    return SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 16)),
        max_model_len=draw(st.integers(8, 48)),
        block_size=draw(st.integers(1, 4)),
        num_kv_blocks=draw(st.integers(2, 24)),
        num_lookahead_tokens=draw(st.integers(0, 4)),
        shuffle_blocks=draw(st.booleans()),
        seed=draw(st.integers(0, 3)),
        long_prefill_token_threshold=draw(st.none() | st.integers(1, 12)),
        max_num_partial_prefills=max_partial,
        max_long_partial_prefills=draw(st.integers(1, max_partial)),
        enable_prefix_caching=draw(st.booleans()),  # every prompt starts 100, 101, ...: many hits
    )


workloads = st.lists(
    st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 12)),  # prompt, max_tokens, arrival
    min_size=1,
    max_size=10,
)


def fake_runner(out: SchedulerOutput, rng: random.Random, gamma: int) -> RunnerOutput:
    """Accept a random prefix of each verified block, then a bonus/recovered token (EOS at 5%)."""
    result = RunnerOutput()
    for seq in out.seqs:
        if not seq.sample:
            continue
        drafts = list(seq.spec_token_ids)
        accepted = drafts[: rng.randint(0, len(drafts))]
        bonus = EOS if rng.random() < 0.05 else rng.randint(3, 50)
        tokens = accepted + [bonus]
        result.sampled_token_ids[seq.request_id] = tokens
        if rng.random() < 0.5:
            result.logprobs[seq.request_id] = [TokenLogprob(t, -1.0) for t in tokens]
        if gamma and rng.random() < 0.8:
            proposal = [
                EOS if rng.random() < 0.1 else rng.randint(3, 50) for _ in range(rng.randint(0, gamma + 2))
            ]
            result.drafts[seq.request_id] = DraftProposal(tuple(proposal), tuple(0.5 for _ in proposal))
    return result


def check_plan(sched: Scheduler, out: SchedulerOutput, oldest: str | None, was_waiting: set[str],
               mirror: TableMirror) -> None:
    """Invariants of one plan; ``mirror`` (the runner's view, rebuilt from the diffs) must equal the
    block manager's tables."""
    config, bm = sched.config, sched.block_manager
    mirror.apply(out)
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.seqs) <= config.max_num_batched_tokens
    assert len(out.seqs) <= config.max_num_seqs and sched.num_running <= config.max_num_seqs
    assert len({s.request_id for s in out.seqs}) == len(out.seqs)
    for seq in out.seqs:
        request = sched.get_request(seq.request_id)
        assert request is not None and request.status == RequestStatus.RUNNING
        num_known = seq.num_known_tokens
        assert seq.start_pos == request.num_computed_tokens and num_known >= 1
        assert seq.spec_token_ids == request.drafts.token_ids[: seq.num_spec_tokens]
        assert seq.sample == (seq.start_pos + num_known == request.num_tokens)
        assert seq.num_spec_tokens == 0 or num_known == 1
        assert seq.num_spec_tokens <= config.num_lookahead_tokens
        assert request.num_output_tokens + seq.num_spec_tokens + 1 <= request.sampling_params.max_tokens
        assert tuple(mirror.tables[seq.request_id]) == bm.block_table(seq.request_id)
        assert seq.num_blocks == bm.blocks_needed(seq.end_pos)
        assert seq.new_request is not None or seq.request_id not in was_waiting
    if out.preempted_request_ids:  # no admissions in a step that preempted
        assert not any(s.request_id in was_waiting for s in out.seqs)
    if oldest is not None:
        assert oldest not in out.preempted_request_ids
        assert oldest in {s.request_id for s in out.seqs}
    for rid in out.preempted_request_ids:
        request = sched.get_request(rid)
        assert request.status == RequestStatus.PREEMPTED and request.num_computed_tokens == 0
        assert request.drafts.token_ids == () and bm.block_table(rid) == ()
    check_queues(sched)


def check_queues(sched: Scheduler) -> None:
    """Waiting requests hold no KV; the blocks in use are exactly the running requests' blocks. (The
    queues are not in arrival order: shorter prompts may pass a long one held by the long-prefill limit.)"""
    bm = sched.block_manager
    bm.check_integrity()
    for request in sched.waiting:
        assert bm.block_table(request.request_id) == ()
    assert bm.num_used_blocks == len({b for r in sched.running for b in bm.block_table(r.request_id)})  # shared once


def check_stats(out: SchedulerOutput, results: list, stats: SchedulerStats, gamma: int) -> None:
    """The step's record: one draft per decode request that emitted tokens (none without a drafter),
    never more accepted than verified nor more verified than planned."""
    assert stats.num_batched_tokens == out.num_batched_tokens
    assert stats.num_decode_requests == sum(s.sample for s in out.seqs)
    if not gamma:
        assert stats.spec_decoding is None
        return
    planned = {s.request_id: s.num_spec_tokens for s in out.seqs}
    emitted = {r.request_id for r in results if r.new_token_ids}
    for draft in stats.spec_decoding.drafts:
        assert draft.request_id in emitted and draft.num_accepted_tokens <= draft.num_draft_tokens <= planned[draft.request_id]


def check_after_update(sched: Scheduler, requests: dict[str, Request], emitted: dict[str, list[int]]) -> None:
    check_queues(sched)
    bm = sched.block_manager
    for request in sched.running:  # exactly the blocks of the cached KV: [0, num_computed_tokens)
        assert len(bm.block_table(request.request_id)) == bm.blocks_needed(request.num_computed_tokens)
        assert request.num_computed_tokens < request.num_tokens
    # Partial-prefill limits: few requests mid-prefill at once, fewer long ones.
    config = sched.config
    left = [r.num_tokens - r.num_computed_tokens for r in sched.running]
    assert sum(n > 1 for n in left) <= config.max_num_partial_prefills
    assert sum(n > config.prefill_chunk_cap for n in left) <= config.max_long_partial_prefills
    for rid, request in requests.items():
        assert request.output_token_ids == emitted[rid]
        assert request.num_output_tokens <= request.sampling_params.max_tokens
        assert EOS not in request.output_token_ids[:-1]
        if request.is_finished:
            assert bm.block_table(rid) == ()
        if request.status == RequestStatus.FINISHED_STOPPED:
            assert request.output_token_ids[-1] == EOS


@settings(max_examples=300, deadline=None)
@given(config=configs(), workload=workloads, seed=st.integers(0, 2**16))
def test_random_workloads_keep_every_invariant(
    config: SchedulerConfig, workload: list[tuple[int, int, int]], seed: int
) -> None:
    rng = random.Random(seed)
    sched = Scheduler(config)
    requests: dict[str, Request] = {}
    emitted: dict[str, list[int]] = {}
    mirror = TableMirror()
    arrivals = sorted((arrival, i, p, m) for i, (p, m, arrival) in enumerate(workload))
    arrivals = [(step, rank, p, m) for rank, (step, _, p, m) in enumerate(arrivals)]  # ids in arrival order
    for step in range(_MAX_STEPS):
        while arrivals and arrivals[0][0] <= step:
            _, i, prompt_len, max_tokens = arrivals.pop(0)
            request = make_request(f"r{i}", prompt_len=prompt_len, max_tokens=max_tokens)
            positions = prompt_len + max_tokens - 1
            fits = prompt_len + max_tokens <= config.max_model_len and positions <= config.num_kv_blocks * config.block_size
            try:
                sched.add_request(request)
            except RequestRejectedError:
                assert not fits
                continue
            assert fits
            requests[request.request_id], emitted[request.request_id] = request, []
        if not arrivals and not sched.has_unfinished_requests():
            break
        if requests and rng.random() < 0.03:
            sched.abort_request(rng.choice(sorted(requests)))
        oldest = sched.running[0].request_id if sched.running else None
        was_waiting = {r.request_id for r in sched.waiting}
        out = sched.schedule()
        check_plan(sched, out, oldest, was_waiting, mirror)
        runner_output = fake_runner(out, rng, config.num_lookahead_tokens)
        if out.seqs and rng.random() < 0.03:
            sched.abort_request(rng.choice(out.seqs).request_id)  # while the step is in flight
        results, stats = sched.update_from_output(out, runner_output)
        for result in results:
            emitted[result.request_id] += result.new_token_ids
            assert result.new_logprobs is None or len(result.new_logprobs) == len(result.new_token_ids)
        check_stats(out, results, stats, config.num_lookahead_tokens)
        check_after_update(sched, requests, emitted)
    else:
        raise AssertionError("the workload did not finish: livelock or starvation")
    final = sched.schedule()
    assert final.is_empty and sched.schedule().finished_request_ids == frozenset()
    assert sched.block_manager.num_free_blocks == config.num_kv_blocks
    assert all(r.is_finished for r in requests.values())
