"""Scheduler speculation bookkeeping and stop checks: verify lengths, rewinds, stops inside blocks."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sparkserve.scheduler.outputs import DraftProposal, RunnerOutput, TokenLogprob
from sparkserve.scheduler.request import Request, RequestStatus
from sparkserve.scheduler.request_rules import check_stop, draft_cap, token_slice
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.scheduler.speculation import VerifyContext
from sparkserve.scheduler.stats import DrafterStats, DraftOutcome, SchedulerStats, SpecDecodingStats
from sparkserve.testing.scheduler_helpers import (
    EOS,
    ScriptedSpeculation,
    make_config,
    make_request,
    prefill_with_drafts,
    run_step,
    seq_tokens,
)


# ---- speculation bookkeeping ------------------------------------------------------------------
def test_verify_step_rewinds_rejected_drafts_and_trims_blocks() -> None:
    sched = Scheduler(make_config(block_size=2, num_lookahead_tokens=5))
    request = make_request("a", prompt_len=3)
    sched.add_request(request)
    run_step(sched, sampled={"a": [10]}, drafts={"a": DraftProposal((11, 12, 13, 14, 15), (0.5,) * 5, draft_id=77)})
    assert request.drafts.token_ids == (11, 12, 13, 14, 15) and request.drafts.confidences == (0.5,) * 5
    assert request.drafts.draft_id == 77
    out = sched.schedule()
    seq = out.seqs[0]
    assert seq_tokens(request, seq) == (10, 11, 12, 13, 14, 15) and seq.num_spec_tokens == 5 and seq.start_pos == 3
    assert seq.spec_draft_id == 77  # the runner finds q under this id
    assert seq.num_blocks == 5 and len(seq.new_block_ids) == 3  # positions [0, 9); 2 blocks were held
    runner = RunnerOutput(sampled_token_ids={"a": [11, 12, 40]})  # 2 accepted + recovered
    (result,), stats = sched.update_from_output(out, runner)
    assert result.new_token_ids == (11, 12, 40)
    assert stats.spec_decoding.drafts == (DraftOutcome("a", "", 5, 2),)
    assert request.num_computed_tokens == request.num_tokens - 1 == 6
    assert len(sched.block_manager.block_table("a")) == 3  # exactly [0, num_computed_tokens)
    assert request.drafts.token_ids == () and request.drafts.confidences == ()  # no new drafts
    assert request.drafts.draft_id is None
    nxt = sched.schedule().seqs[0]  # the runner is told to cut its table back to the 3 kept blocks
    assert nxt.num_blocks - len(nxt.new_block_ids) == 3


def test_stop_inside_accepted_block_drops_later_tokens() -> None:
    sched = Scheduler(make_config(num_lookahead_tokens=3))
    request = make_request("a")
    sched.add_request(request)
    prefill_with_drafts(sched, "a", (11, EOS, 13))
    out = sched.schedule()
    logprobs = [TokenLogprob(t, -0.1) for t in (11, EOS, 13, 14)]
    runner = RunnerOutput(sampled_token_ids={"a": [11, EOS, 13, 14]}, logprobs={"a": logprobs})
    (result,), stats = sched.update_from_output(out, runner)
    assert result.new_token_ids == (11, EOS) and result.finish_reason == "stop"
    assert result.stop_reason is None and [lp.token_id for lp in result.new_logprobs] == [11, EOS]
    (draft,) = stats.spec_decoding.drafts  # nothing past the stop counts
    assert draft.num_draft_tokens == 2 and draft.num_accepted_tokens == 2
    assert request.output_token_ids == [10, 11, EOS]
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks
    assert not sched.has_unfinished_requests() and sched.has_finished_requests()
    assert sched.schedule().finished_request_ids == frozenset({"a"})
    assert sched.schedule().finished_request_ids == frozenset()


def test_stop_token_ids_set_stop_reason_and_ignore_eos_continues() -> None:
    sched = Scheduler(make_config(num_lookahead_tokens=3))
    sched.add_request(make_request("a", stop_token_ids=(50,), ignore_eos=True))
    prefill_with_drafts(sched, "a", (EOS, 50, 13))
    out = sched.schedule()
    (result,), _ = sched.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [EOS, 50, 13, 14]}))
    assert result.new_token_ids == (EOS, 50) and result.stop_reason == 50 and result.finish_reason == "stop"


def test_max_tokens_caps_drafts_and_stop_at_cap_is_stop() -> None:
    sched = Scheduler(make_config(num_lookahead_tokens=7))
    request = make_request("a", max_tokens=4)
    sched.add_request(request)
    prefill_with_drafts(sched, "a", (11, 12, 13, 14, 15, 16, 17))
    out = sched.schedule()
    assert out.seqs[0].num_spec_tokens == 2  # 1 output so far: 3 left, the step emits l_r + 1
    (result,), _ = sched.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [11, 12, 99]}))
    assert result.finish_reason == "length" and request.num_output_tokens == 4

    sched.add_request(make_request("b", max_tokens=2))
    prefill_with_drafts(sched, "b", (EOS,))
    out = sched.schedule()
    (result,), _ = sched.update_from_output(out, RunnerOutput(sampled_token_ids={"b": [EOS]}))
    assert result.finish_reason == "stop"


def test_verify_lengths_policy_and_clipping() -> None:
    calls: list[tuple[list[str], int]] = []
    contexts: list[VerifyContext] = []

    def greedy_policy(requests: Sequence[Request], budget_left: int, context: VerifyContext) -> list[int]:
        calls.append(([r.request_id for r in requests], budget_left))
        contexts.append(context)
        return [100] * len(requests)

    config = make_config(max_num_batched_tokens=8, num_lookahead_tokens=4)
    sched = Scheduler(config, ScriptedSpeculation(lengths=greedy_policy))
    for rid in "abc":
        sched.add_request(make_request(rid, prompt_len=2))
    drafts = {"a": DraftProposal((1,) * 6), "b": DraftProposal((1, 1)), "c": DraftProposal(())}
    run_step(sched, drafts=drafts)
    out = sched.schedule()
    assert calls == [(["a", "b"], 8 - 3)]  # c has no drafts; 3 base tokens already spent
    assert contexts == [VerifyContext(num_scheduled_tokens=3, num_decode_requests=3, token_budget=8)]
    assert [s.num_spec_tokens for s in out.seqs] == [4, 1, 0]  # a: gamma; b: budget left
    assert sched.get_request("a").drafts.token_ids == (1,) * 4  # unverifiable drafts dropped
    assert out.num_batched_tokens == 8


def test_drafting_gate_marks_seqs_and_keeps_last_confidences() -> None:
    """select_drafting sees the decode requests (after the verify lengths are chosen) and its flags
    become ``ScheduledSeq.draft``; a request's latest confidences outlive the drafts they came with."""
    seen: list[tuple[list[str], VerifyContext]] = []

    def gate(requests: Sequence[Request], context: VerifyContext) -> list[bool]:
        seen.append(([r.request_id for r in requests], context))
        return [r.request_id != "b" for r in requests]

    speculation = ScriptedSpeculation(gate=gate)
    sched = Scheduler(make_config(max_num_batched_tokens=16, num_lookahead_tokens=3), speculation)
    for rid in "ab":
        sched.add_request(make_request(rid, prompt_len=2))
    out, _ = run_step(sched, drafts={"a": DraftProposal((1, 1, 1), (0.9, 0.8, 0.7))})
    assert seen == [] and all(s.draft for s in out.seqs)  # prefill-completing requests always draft
    a = sched.get_request("a")
    assert a.drafts.last_confidences == (0.9, 0.8, 0.7) and a.drafts.last_num_tokens == a.num_tokens
    out, _ = run_step(sched, sampled={"a": [1, 1, 1, 5]})
    # the gate plans the next step: this step's 2 base tokens, not the 3 verify tokens spent now
    assert seen[0][0] == ["a", "b"] and seen[0][1].num_scheduled_tokens == 2
    assert [(s.request_id, s.num_spec_tokens, s.draft) for s in out.seqs] == [("a", 3, True), ("b", 0, False)]
    assert a.drafts.token_ids == () and a.drafts.last_confidences == (0.9, 0.8, 0.7)  # kept as the estimate
    speculation.gate = lambda requests, context: [True]
    with pytest.raises(ValueError, match="select_drafting returned 1 flags for 2 requests"):
        sched.schedule()


def test_verify_lengths_policy_contract_violations_raise() -> None:
    sched = Scheduler(make_config(num_lookahead_tokens=2), ScriptedSpeculation(lengths=lambda reqs, budget, ctx: []))
    sched.add_request(make_request("a"))
    prefill_with_drafts(sched, "a", (1, 1))
    with pytest.raises(ValueError):
        sched.schedule()


def test_runner_returning_too_many_tokens_raises() -> None:
    sched = Scheduler(make_config())
    sched.add_request(make_request("a"))
    out = sched.schedule()
    with pytest.raises(ValueError):
        sched.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [1, 2]}))


def test_update_returns_one_stats_record_per_step() -> None:
    """The step's record counts every decode request's verify step (l_r = 0 included, the first token
    after a prefill not), per position and per drafter, with the step's B, R, preemptions and drafting."""
    sched = Scheduler(make_config(num_lookahead_tokens=3))
    for rid in "abc":
        sched.add_request(make_request(rid, prompt_len=2))
    first = sched.schedule()
    proposals = {"a": DraftProposal((1, 1, 1), drafter="dspark"), "b": DraftProposal((1, 1), drafter="suffix")}
    outputs, stats = sched.update_from_output(first, RunnerOutput({r: [5] for r in "abc"}, drafts=proposals))
    assert len(outputs) == 3 and stats.spec_decoding == SpecDecodingStats.of(3, ())  # prefills: no drafts
    assert (stats.num_batched_tokens, stats.num_decode_requests, stats.num_drafting) == (6, 3, 2)
    step = sched.schedule()
    _, stats = sched.update_from_output(step, RunnerOutput({"a": [1, 1, 7], "b": [9], "c": [4]}))
    spec = stats.spec_decoding
    assert spec.drafts == (DraftOutcome("a", "dspark", 3, 2), DraftOutcome("b", "suffix", 2, 0),
                           DraftOutcome("c", "", 0, 0))
    assert (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) == (3, 5, 2)
    assert spec.num_verified_per_pos == (2, 2, 1) and spec.num_accepted_per_pos == (1, 1, 0)
    assert spec.per_drafter == (DrafterStats("dspark", 1, 3, 2), DrafterStats("suffix", 1, 2, 0))
    assert spec.accepted_length == 1 + 2 / 3
    assert stats == SchedulerStats(num_batched_tokens=8, num_decode_requests=3, spec_decoding=spec)
    assert SpecDecodingStats.merge(3, [spec, None, spec]).num_accepted_per_pos == (2, 2, 0)
    with pytest.raises(ValueError, match="accepted <= verified"):
        SpecDecodingStats.of(3, [DraftOutcome("x", "", 1, 2)])
    no_spec = Scheduler(make_config())
    no_spec.add_request(make_request("a"))
    assert no_spec.update_from_output(no_spec.schedule(), RunnerOutput({"a": [5]})).stats.spec_decoding is None


def test_speculation_collaborator_is_told_verified_drafts_and_finishes() -> None:
    """on_verified gets the stated confidences of the verified drafts, l_r and the accepted count (before
    stop checks); on_finished every finished request, aborts included."""
    speculation = ScriptedSpeculation()
    sched = Scheduler(make_config(num_lookahead_tokens=3), speculation)
    for rid in "ab":
        sched.add_request(make_request(rid))
    run_step(sched, drafts={"a": DraftProposal((11, EOS, 13), (0.9, 0.8, 0.7), drafter="dspark")})
    sched.abort_request("b")
    assert speculation.finished == ["b"]
    run_step(sched, sampled={"a": [11, EOS, 13, 14]})
    assert speculation.verified == [("a", (0.9, 0.8, 0.7), 3, 3)]
    assert speculation.finished == ["b", "a"]


# ---- pure rules -------------------------------------------------------------------------------
def test_check_stop_order_and_token_slice() -> None:
    request = make_request("a", max_tokens=1, stop_token_ids=(9,))
    request.output_token_ids.append(9)
    assert check_stop(request, 9, 256) == RequestStatus.FINISHED_STOPPED and request.stop_reason == 9
    request = make_request("b", max_tokens=1)
    request.output_token_ids.append(5)
    assert check_stop(request, 5, 256) == RequestStatus.FINISHED_LENGTH
    request = make_request("c", prompt_len=3, max_tokens=10)
    request.output_token_ids.append(5)
    assert check_stop(request, 5, max_model_len=4) == RequestStatus.FINISHED_LENGTH
    assert check_stop(request, 5, max_model_len=5) is None
    assert token_slice(request, 1, 4) == (101, 102, 5) and token_slice(request, 3, 4) == (5,)


def test_draft_cap() -> None:
    request = make_request("a", prompt_len=10, max_tokens=8)
    request.output_token_ids.extend([1, 2])
    assert draft_cap(request, num_lookahead_tokens=7, max_model_len=100) == 8 - 2 - 1
    assert draft_cap(request, num_lookahead_tokens=3, max_model_len=100) == 3
    assert draft_cap(request, num_lookahead_tokens=7, max_model_len=14) == 14 - 12 - 1
    assert draft_cap(request, num_lookahead_tokens=7, max_model_len=12) == 0
