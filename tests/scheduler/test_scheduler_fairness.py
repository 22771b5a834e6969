"""Fairness of chunked prefill (vLLM's partial-prefill limits) and fault isolation in the scheduler."""

from __future__ import annotations

from sparkserve.scheduler.isolation import ISOLATION_SAMPLES
from sparkserve.scheduler.request import RequestStatus
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.testing.scheduler_helpers import make_config, make_request, run_step

LONG = 7000
BUDGET = 1024  # the engine's default max_num_batched_tokens


def _big_config(**overrides: object):
    values: dict[str, object] = dict(
        max_num_seqs=16, max_num_batched_tokens=BUDGET, max_model_len=8192, block_size=16, num_kv_blocks=4096
    )
    values.update(overrides)
    return make_config(**values)


def test_short_request_behind_eight_long_prompts_runs_at_once() -> None:
    """Eight 7,000-token prompts, then a 30-token chat: the chat is scheduled (and samples its first
    token) in the first step after it arrives, and decodes every step after that while the long
    prompts keep prefilling, each chunk within its share unless nobody else needs the budget."""
    sched = Scheduler(_big_config())
    for i in range(8):
        sched.add_request(make_request(f"long{i}", prompt_len=LONG, max_tokens=4))
    for _ in range(3):
        out, _ = run_step(sched)
        assert [s.request_id for s in out.seqs] == ["long0"] and out.num_batched_tokens == BUDGET
    sched.add_request(make_request("chat", prompt_len=30, max_tokens=8))
    out, outputs = run_step(sched)
    chunks = {s.request_id: s.num_new_tokens for s in out.seqs}
    assert chunks["chat"] == 30 and [o.request_id for o in outputs] == ["chat"]  # first token: 1 step
    assert chunks["long0"] == BUDGET - 30 and out.num_batched_tokens == BUDGET  # top-up: leftovers
    for _ in range(7):  # the chat decodes every step until it finishes
        out, outputs = run_step(sched)
        assert any(s.request_id == "chat" and s.sample for s in out.seqs)
        assert sum(s.num_new_tokens for s in out.seqs if s.request_id.startswith("long")) == BUDGET - 1
    assert sched.get_request("chat") is None  # finished after max_tokens = 8 steps
    assert sum(r.request_id.startswith("long") for r in sched.running) == 1  # one long prefill at a time


def test_long_prefill_capped_when_short_prompts_wait() -> None:
    """Many short prompts arriving together with a long one: the long chunk is capped at the
    threshold and the short prompts share the rest (the last one gets a partial chunk)."""
    sched = Scheduler(_big_config(long_prefill_token_threshold=256))
    sched.add_request(make_request("long", prompt_len=LONG))
    for i in range(10):
        sched.add_request(make_request(f"s{i}", prompt_len=100))
    out, _ = run_step(sched)
    chunks = {s.request_id: s.num_new_tokens for s in out.seqs}
    assert chunks == {"long": 256, **{f"s{i}": 100 for i in range(7)}, "s7": BUDGET - 256 - 700}


def test_partial_prefill_limits_skip_but_do_not_starve_long_prompts() -> None:
    sched = Scheduler(_big_config(max_num_batched_tokens=512, max_long_partial_prefills=1))
    sched.add_request(make_request("a", prompt_len=2000, max_tokens=1))
    sched.add_request(make_request("b", prompt_len=2000, max_tokens=1))
    sched.add_request(make_request("c", prompt_len=20, max_tokens=1))
    out, _ = run_step(sched)
    assert [s.request_id for s in out.seqs] == ["a", "c"]  # b (long) skipped, c passes it
    steps = 1
    while sched.get_request("b") is not None and steps < 20:
        out, _ = run_step(sched)
        steps += 1
        assert "b" not in {s.request_id for s in out.seqs} or sched.get_request("a") is None
    assert sched.get_request("b") is None and steps <= 9  # b went next and finished: 2 x 2000 / 512


def test_rollback_isolates_and_alternates_solo_steps() -> None:
    sched = Scheduler(make_config(max_num_batched_tokens=64))
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, prompt_len=4, max_tokens=20))
    run_step(sched)
    run_step(sched)
    used = sched.block_manager.num_used_blocks
    assert sched.rollback_request("b", num_output_tokens=1)
    assert sched.get_request("b").num_output_tokens == 1 and sched.get_request("b").num_computed_tokens == 0
    assert sched.block_manager.num_used_blocks < used and sched.isolated_request_ids == ("b",)
    out, _ = run_step(sched)
    assert [s.request_id for s in out.seqs] == ["b"] and out.seqs[0].new_request is not None
    assert "b" in out.finished_request_ids  # the runner drops its old state before re-creating it
    assert (out.seqs[0].start_pos, out.seqs[0].num_known_tokens) == (0, 5)  # prompt + the delivered output
    assert out.seqs[0].new_request.output_token_ids == (7,)
    out, _ = run_step(sched)
    assert {s.request_id for s in out.seqs} == {"a", "c"}  # normal step: isolated request left out
    for _ in range(ISOLATION_SAMPLES - 1):
        out, _ = run_step(sched)
        assert [s.request_id for s in out.seqs] == ["b"]
        run_step(sched)
    assert sched.isolated_request_ids == ()
    out, _ = run_step(sched)
    assert {s.request_id for s in out.seqs} == {"a", "b", "c"}  # back in normal steps
    assert not sched.rollback_request("nope", 0)


def test_isolated_waiting_request_pauses_admission() -> None:
    sched = Scheduler(make_config(max_num_seqs=2))
    sched.add_request(make_request("a", max_tokens=20))
    sched.add_request(make_request("b", max_tokens=20))
    run_step(sched)
    sched.rollback_request("a", 0)
    sched.add_request(make_request("c"))
    for _ in range(4):
        out, _ = run_step(sched)
        assert "c" not in {s.request_id for s in out.seqs}  # a (isolated) goes before c
    assert sched.get_request("a").status == RequestStatus.RUNNING
