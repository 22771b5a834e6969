"""Scheduler rules: admission, token budget, chunked prefill, max_num_seqs, preemption, abort."""

from __future__ import annotations

import pytest

from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.scheduler.outputs import DraftProposal, RunnerOutput
from sparkserve.scheduler.request import RequestStatus
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.testing.scheduler_helpers import (
    TableMirror,
    make_config,
    make_request,
    run_step,
    seq_of,
    seq_tokens,
)


# ---- config and admission -------------------------------------------------------------------
def test_config_validation() -> None:
    with pytest.raises(ValueError):
        make_config(max_num_seqs=0)
    with pytest.raises(ValueError):
        make_config(num_lookahead_tokens=-1)
    with pytest.raises(ValueError):
        make_config(max_num_seqs=8, max_num_batched_tokens=4)


def test_reject_prompt_plus_max_tokens_over_model_len() -> None:
    sched = Scheduler(make_config(max_model_len=32))
    sched.add_request(make_request("ok", prompt_len=16, max_tokens=16))  # exactly at the limit
    with pytest.raises(RequestRejectedError) as info:
        sched.add_request(make_request("long", prompt_len=16, max_tokens=17))
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(RequestRejectedError) as info:
        sched.add_request(make_request("huge", prompt_len=32, max_tokens=1))
    assert info.value.param == "prompt"
    assert sched.num_waiting == 1 and sched.get_request("long") is None


def test_reject_request_needing_more_blocks_than_exist() -> None:
    sched = Scheduler(make_config(block_size=4, num_kv_blocks=2))  # 8 positions
    sched.add_request(make_request("fits", prompt_len=4, max_tokens=5))  # 4 + 5 - 1 = 8 positions
    with pytest.raises(RequestRejectedError) as info:
        sched.add_request(make_request("big", prompt_len=4, max_tokens=6))
    assert info.value.code == "kv_cache_too_small" and info.value.param == "max_tokens"
    assert isinstance(info.value, ValueError)
    with pytest.raises(RequestRejectedError) as info:  # the prompt alone is larger than the cache
        sched.add_request(make_request("huge", prompt_len=9, max_tokens=1))
    assert info.value.code == "kv_cache_too_small" and info.value.param == "prompt"


def test_sampling_params_the_step_cannot_use_are_rejected() -> None:
    from sparkserve.scheduler.request_rules import check_sampling_params
    from sparkserve.scheduler.sampling_params import SamplingParams

    check_sampling_params(SamplingParams(seed=2**63 - 1, logit_bias=((5, 1.0),), target_tpot_ms=0.5), 10)
    bad = [
        (dict(seed=2**63), "seed"), (dict(seed=-(2**63) - 1), "seed"),
        (dict(target_tpot_ms=5e-324), "target_tpot_ms"), (dict(target_tpot_ms=float("inf")), "target_tpot_ms"),
        (dict(temperature=float("inf")), "temperature"), (dict(logit_bias=((1, float("nan")),)), "logit_bias"),
        (dict(logit_bias=((10, 1.0),)), "logit_bias"), (dict(stop_token_ids=(99,)), "stop_token_ids"),
    ]
    for fields, param in bad:
        try:
            params = SamplingParams(**fields)
        except ValueError:
            continue  # SamplingParams refuses it itself
        with pytest.raises(RequestRejectedError) as info:
            check_sampling_params(params, 10)
        assert info.value.param == param, fields


def test_reject_empty_prompt_and_duplicate_id() -> None:
    sched = Scheduler(make_config())
    with pytest.raises(RequestRejectedError):
        sched.add_request(make_request("empty", prompt_len=0))
    sched.add_request(make_request("a"))
    with pytest.raises(RequestRejectedError) as info:
        sched.add_request(make_request("a"))
    assert info.value.code == "duplicate_request_id"


def test_a_request_that_fits_exactly_runs_to_completion_alone() -> None:
    sched = Scheduler(make_config(block_size=4, num_kv_blocks=2, max_num_batched_tokens=8))
    request = make_request("a", prompt_len=4, max_tokens=5)
    sched.add_request(request)
    while sched.has_unfinished_requests():
        out, _ = run_step(sched)
        assert not out.preempted_request_ids
    assert request.status == RequestStatus.FINISHED_LENGTH and request.num_output_tokens == 5
    assert sched.block_manager.num_free_blocks == 2


# ---- chunked prefill, mixing and limits -----------------------------------------------------
def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = Scheduler(make_config(max_num_batched_tokens=4, max_num_seqs=1))
    request = make_request("a", prompt_len=10)
    sched.add_request(request)
    chunks = []
    mirror = TableMirror()
    for _ in range(3):
        tokens = None

        def capture(out):
            nonlocal tokens
            mirror.apply(out)
            tokens = seq_tokens(request, out.seqs[0])

        out, outputs = run_step(sched, on_schedule=capture)
        seq = out.seqs[0]
        chunks.append((seq.start_pos, tokens, seq.sample))
        assert len(mirror.tables["a"]) == seq.num_blocks == -(-seq.end_pos // 4)
        assert mirror.tables["a"] == list(sched.block_manager.block_table("a"))
    assert chunks == [
        (0, tuple(range(100, 104)), False),
        (4, tuple(range(104, 108)), False),
        (8, (108, 109), True),
    ]
    assert outputs[0].new_token_ids == (7,) and request.num_computed_tokens == 10
    out = sched.schedule()
    assert seq_tokens(request, out.seqs[0]) == (7,) and out.seqs[0].start_pos == 10  # decode of the base token
    assert out.seqs[0].new_block_ids == () and out.seqs[0].num_blocks == 3  # the diff: nothing new


def test_decode_mixes_with_prefill_chunk_in_one_step() -> None:
    sched = Scheduler(make_config(max_num_batched_tokens=8))
    sched.add_request(make_request("a", prompt_len=2))
    run_step(sched)
    sched.add_request(make_request("b", prompt_len=20))
    out, _ = run_step(sched)
    assert [(s.request_id, s.num_new_tokens, s.sample) for s in out.seqs] == [("a", 1, True), ("b", 7, False)]
    assert out.num_batched_tokens == 8


def test_running_prefill_continues_before_new_admissions() -> None:
    sched = Scheduler(make_config(max_num_batched_tokens=8, long_prefill_token_threshold=8))  # no cap
    sched.add_request(make_request("a", prompt_len=11))
    run_step(sched)
    sched.add_request(make_request("b", prompt_len=3))
    out, _ = run_step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.seqs] == [("a", 3), ("b", 3)]


def test_max_num_seqs_respected() -> None:
    sched = Scheduler(make_config(max_num_seqs=2))
    for i in range(5):
        sched.add_request(make_request(f"r{i}", max_tokens=3 + i))
    out, _ = run_step(sched)
    assert {s.request_id for s in out.seqs} == {"r0", "r1"} and sched.num_waiting == 3
    while sched.has_unfinished_requests():
        out, _ = run_step(sched)
        assert len(out.seqs) <= 2 and sched.num_running <= 2


def test_new_request_data_only_on_first_schedule() -> None:
    sched = Scheduler(make_config())
    sched.add_request(make_request("a", temperature=0.0))
    out, _ = run_step(sched)
    new = out.seqs[0].new_request
    assert new is not None and new.num_prompt_tokens == 4 and new.sampling_params.greedy
    assert not new.output_token_ids  # a first prefill, not a resumed request
    out, _ = run_step(sched)
    assert out.seqs[0].new_request is None


# ---- preemption -----------------------------------------------------------------------------
def test_preemption_youngest_first_and_oldest_progresses() -> None:
    sched = Scheduler(make_config(block_size=2, num_kv_blocks=6))
    for rid in "abc":
        sched.add_request(make_request(rid, prompt_len=2, max_tokens=6))
    preempted: list[str] = []
    a_progress = []
    for _ in range(8):
        a_unfinished = sched.get_request("a") is not None
        out, _ = run_step(sched)
        preempted += out.preempted_request_ids
        assert "a" in {s.request_id for s in out.seqs} or not a_unfinished
        a_progress.append(sched.get_request("a").num_output_tokens if sched.get_request("a") else 6)
        sched.block_manager.check_integrity()
    assert preempted[:2] == ["c", "b"]
    assert a_progress == sorted(a_progress) and a_progress[-1] == 6
    assert sched.num_preemptions_total == len(preempted)


def test_preempted_request_resumes_with_outputs_kept() -> None:
    sched = Scheduler(make_config(block_size=2, num_kv_blocks=6))
    for rid in "abc":
        sched.add_request(make_request(rid, prompt_len=2, max_tokens=6))
    c = sched.get_request("c")
    out, _ = run_step(sched)
    while "c" not in out.preempted_request_ids:
        out, _ = run_step(sched)
        assert not any(s.new_request for s in out.seqs) or not out.preempted_request_ids
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert sched.block_manager.block_table("c") == () and list(sched.waiting)[0] is c
    outputs_so_far = tuple(c.output_token_ids)
    assert outputs_so_far
    while True:
        out, _ = run_step(sched)
        if any(s.request_id == "c" for s in out.seqs):
            break
    seq = seq_of(out, "c")
    assert seq.new_request is not None and seq.new_request.output_token_ids  # resumed: re-prefills its outputs
    assert seq.new_request.output_token_ids == outputs_so_far and seq.new_request.num_prompt_tokens == 2
    assert seq.start_pos == 0 and seq.num_known_tokens == 2 + len(outputs_so_far) and seq.sample
    assert seq.new_request.prompt_token_ids == (100, 101)
    assert len(seq.new_block_ids) == seq.num_blocks  # a re-created request gets its whole table


def test_youngest_request_preempts_itself_when_it_is_the_only_candidate() -> None:
    sched = Scheduler(make_config(block_size=4, num_kv_blocks=3))
    sched.add_request(make_request("a", prompt_len=5, max_tokens=8))
    sched.add_request(make_request("b", prompt_len=4, max_tokens=4))
    run_step(sched)  # a: 2 blocks, b: 1 block, 0 free
    out, _ = run_step(sched)  # a fits in its blocks; b needs a 2nd block
    assert out.preempted_request_ids == ("b",)
    assert [s.request_id for s in out.seqs] == ["a"]
    assert sched.get_request("b").status == RequestStatus.PREEMPTED


def test_drafts_never_preempt_and_are_dropped_on_preemption() -> None:
    sched = Scheduler(make_config(block_size=2, num_kv_blocks=4, num_lookahead_tokens=4))
    sched.add_request(make_request("a", prompt_len=2, max_tokens=6))
    sched.add_request(make_request("b", prompt_len=2, max_tokens=6))
    drafts = {rid: DraftProposal((1, 1, 1, 1), (0.9,) * 4) for rid in "ab"}
    run_step(sched, drafts=drafts)  # a, b: 1 block each, 2 free
    out = sched.schedule()  # base tokens at position 2 take the 2 free blocks
    assert not out.preempted_request_ids
    # Drafts only fill the room left in the blocks already held (position 3), never preempt.
    assert [s.num_spec_tokens for s in out.seqs] == [1, 1]
    assert sched.block_manager.num_free_blocks == 0
    runner = RunnerOutput(sampled_token_ids={"a": [1, 9], "b": [1, 9]}, drafts=drafts)
    sched.update_from_output(out, runner)
    out = sched.schedule()  # a's base at position 4 needs a 3rd block: b is preempted
    b = sched.get_request("b")
    assert out.preempted_request_ids == ("b",) and b.drafts.token_ids == () and b.drafts.confidences == ()
    assert seq_of(out, "a").num_spec_tokens == 6 - 3 - 1  # max_tokens cap; the room is 3
    sched.block_manager.check_integrity()


# ---- abort ----------------------------------------------------------------------------------
def test_abort_running_waiting_unknown_and_in_flight() -> None:
    sched = Scheduler(make_config(max_num_seqs=1))
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    run_step(sched)
    sched.abort_request("b")  # waiting
    sched.abort_request("nobody")
    out = sched.schedule()
    assert out.finished_request_ids == frozenset({"b"})
    sched.abort_request("a")  # in flight: the update skips it
    assert sched.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [5]})).outputs == []
    sched.abort_request("a")
    assert sched.schedule().finished_request_ids == frozenset({"a"})
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks
    assert not sched.has_unfinished_requests()


def test_shuffled_blocks_are_not_contiguous() -> None:
    sched = Scheduler(make_config(block_size=1, num_kv_blocks=64, shuffle_blocks=True, seed=3))
    sched.add_request(make_request("a", prompt_len=32, max_tokens=4))
    out, _ = run_step(sched)
    table = out.seqs[0].new_block_ids
    assert len(table) == 32 and list(table) != sorted(table)
