"""The speculative-decoding contract on tiny random targets (fp32): the Drafter Protocol, drafts taken
from ``ScheduledSeq``, the persistent batch against a from-scratch rebuild, keyed sampling (the same
seeded text alone, under load and at any verify length), the logits-mask hook, the controller's state."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.input_batch import InputBatch
from sparkserve.engine.model_runner import ModelRunner
from sparkserve.engine.spec_decode import draft_sampling
from sparkserve.engine.spec_decode import verifier as verifier_module
from sparkserve.engine.spec_decode.draft_model import DraftModelDrafter
from sparkserve.engine.spec_decode.draft_store import DraftMismatchError, DraftStore
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.engine.spec_decode.dspark_loader import random_drafter_config
from sparkserve.scheduler.config import SchedulerConfig
from sparkserve.scheduler.outputs import (
    DraftProposal,
    NewRequestData,
    RunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.scheduler import Scheduler
from sparkserve.testing.reference import greedy_reference
from sparkserve.testing.scheduler_helpers import EOS, make_request, seq_tokens
from sparkserve.testing.spec_records import spec_totals
from sparkserve.testing.spec_stats import chi2, chi2_bound, exact_joint, sampled_joint
from sparkserve.testing.tiny import OracleDrafter, random_dspark, tiny_target
from sparkserve.train.drafters import ARDrafter


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=0)


def _core(target, drafter=None, policy: str = "fixed:7", profile: ThroughputProfile | None = None, **kw) -> EngineCore:
    args = EngineArgs(dtype="float32", num_kv_blocks=kw.pop("num_kv_blocks", 512), block_size=4,
                      max_num_batched_tokens=kw.pop("max_num_batched_tokens", 256),
                      max_num_seqs=kw.pop("max_num_seqs", 32), drafter="none" if drafter is None else None,
                      verify_policy=policy, **kw)
    return EngineCore(args, loaded=target, drafter=drafter, profile=profile)


# ---------------------------------------------------------------- the Drafter Protocol
def test_every_drafter_implements_the_protocol(target) -> None:
    drafters = [random_dspark(target), random_dspark(target, markov_rank=0, confidence=False),
                DraftModelDrafter(target.model, 3), OracleDrafter(target)]
    config = random_drafter_config(target.config, target_layer_ids=(0, 1), block_size=3, num_layers=1,
                                   markov_rank=0, confidence=False)
    ar = ARDrafter(config, target.model.embed_tokens.weight, target.model.lm_head_weight)
    for drafter in [*drafters, ar]:
        assert isinstance(drafter, Drafter), type(drafter)
        assert drafter.num_speculative_tokens >= 1 and isinstance(drafter.name, str)
    assert [d.name for d in drafters] == ["dspark", "dflash", "draft-model", "oracle"]
    with pytest.raises(TypeError, match="Drafter Protocol"):
        from sparkserve.engine.spec_decode.speculator import Speculator

        Speculator(object(), 8, 4, torch.float32, 4)  # type: ignore[arg-type]


# ---------------------------------------------------------------- drafts through ScheduledSeq
def _runner(target) -> ModelRunner:
    return ModelRunner(target.model, target.config, 64, 4, torch.float32, max_num_seqs=4, max_model_len=128)


def test_drafts_are_taken_from_the_scheduled_seq(target) -> None:
    """The runner verifies exactly the drafts the scheduler sends (here deterministic, one-hot q):
    two correct drafts then a wrong one accept 2 and recover the target's token; other drafts give
    another result, so a runner reading drafts from anywhere else fails this test."""
    prompt = [3, 9, 27, 4, 11]
    ref = greedy_reference(target.model, prompt, 6).token_ids
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    for drafts, expected, accepted in (((ref[1], ref[2], (ref[3] + 1) % 61), ref[1:4], 2),
                                       (((ref[1] + 1) % 61, ref[2], ref[3]), ref[1:2], 0),
                                       ((ref[1], ref[2], ref[3]), ref[1:5], 3)):
        runner = _runner(target)
        new = NewRequestData(tuple(prompt), greedy)
        first = runner.execute(SchedulerOutput((ScheduledSeq("a", 0, 5, new_block_ids=(7, 2), num_blocks=2,
                                                             new_request=new),)))
        assert first.sampled_token_ids["a"] == [ref[0]]
        seq = ScheduledSeq("a", 5, 1, spec_token_ids=drafts, new_block_ids=(5,), num_blocks=3)
        out = runner.execute(SchedulerOutput((seq,)))
        assert out.sampled_token_ids["a"] == list(expected)
        assert runner.batch.requests["a"].num_computed == 6 + accepted


def test_stored_draft_mismatch_raises() -> None:
    store = DraftStore()
    draft_id = store.put("a", (4, 5, 6), None)
    with pytest.raises(DraftMismatchError, match="not a prefix"):
        store.take("a", draft_id, (4, 6))
    store.put("a", (4, 5, 6), None)
    with pytest.raises(DraftMismatchError, match="verifying draft 99"):
        store.take("a", 99, (4,))
    with pytest.raises(DraftMismatchError, match="the runner holds None"):
        store.take("b", 1, (4,))
    again = store.put("a", (4, 5, 6), None)
    assert store.take("a", again, (4, 5)).token_ids == (4, 5, 6) and len(store) == 0


# ---------------------------------------------------------------- persistent batch
@settings(max_examples=40, deadline=None)
@given(workload=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 10)), min_size=1, max_size=8),
       seed=st.integers(0, 1000))
def test_persistent_batch_equals_a_rebuild(workload, seed: int) -> None:
    """Random add / finish / preempt / abort sequences with shuffled block ids: after every schedule the
    runner's rows (tokens, computed tokens, block tables) and the step inputs built from them equal a
    from-scratch rebuild from the scheduler's requests."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=2,
                             num_kv_blocks=24, num_lookahead_tokens=3, shuffle_blocks=True, seed=seed)
    sched = Scheduler(config)
    batch = InputBatch(4, 64 + 4, 2, 61, torch.device("cpu"))
    pending = [make_request(f"r{i}", prompt_len=p, max_tokens=m) for i, (p, m) in enumerate(workload)]
    for _ in range(400):
        if pending and rng.random() < 0.5:
            request = pending.pop(0)
            request.prompt_token_ids = [rng.randint(3, 60) for _ in request.prompt_token_ids]
            sched.add_request(request)
        if not sched.has_unfinished_requests() and not pending:
            break
        if sched.running and rng.random() < 0.05:
            sched.abort_request(rng.choice(sched.running).request_id)
        out = sched.schedule()
        batch.apply(out)
        _check_rebuild(sched, batch, out)
        result = RunnerOutput()
        for seq in out.seqs:
            if not seq.sample:
                batch.record(seq, (), 0)
                continue
            accepted = list(seq.spec_token_ids[: rng.randint(0, seq.num_spec_tokens)])
            tokens = accepted + [EOS if rng.random() < 0.05 else rng.randint(3, 60)]
            batch.record(seq, tokens, len(accepted))
            result.sampled_token_ids[seq.request_id] = tokens
            drafts = tuple(rng.randint(3, 60) for _ in range(3))
            result.drafts[seq.request_id] = DraftProposal(drafts, (0.5,) * 3, draft_id=rng.randint(0, 99))
        sched.update_from_output(out, result)
    assert not sched.has_unfinished_requests()


def _check_rebuild(sched: Scheduler, batch: InputBatch, out: SchedulerOutput) -> None:
    bm = sched.block_manager
    for seq in out.seqs:
        request = sched.get_request(seq.request_id)
        state = batch.requests[seq.request_id]
        assert state.block_ids == list(bm.block_table(seq.request_id))
        assert batch.block_table[state.row, : len(state.block_ids)].tolist() == state.block_ids
        assert batch.history(seq.request_id) == request.all_token_ids
        assert state.num_computed == request.num_computed_tokens and state.num_tokens == request.num_tokens
    gone = set(out.finished_request_ids) | set(out.preempted_request_ids)
    assert not gone & set(batch.requests)
    if not out.seqs:
        return
    inputs = batch.prepare(out.seqs)
    ids, positions, slots = [], [], []
    for seq in out.seqs:
        request = sched.get_request(seq.request_id)
        table = bm.block_table(seq.request_id)
        ids += seq_tokens(request, seq)
        positions += range(seq.start_pos, seq.end_pos)
        slots += [table[p // 2] * 2 + p % 2 for p in range(seq.start_pos, seq.end_pos)]
    assert inputs.input_ids.tolist() == ids and inputs.positions.tolist() == positions
    assert inputs.slot_mapping.tolist() == slots


# ---------------------------------------------------------------- keyed sampling
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)


def _others(n: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0 if i % 3 == 0 else 1.1, seed=None if i % 2 else 77 + i, max_tokens=20,
                           ignore_eos=True) for i in range(n)]


def _seeded_text(core: EngineCore, prompt: list[int], concurrent: int = 0, steps: list | None = None) -> list[int]:
    prompts = [prompt] + [[5 + i, 7, 9] for i in range(concurrent)]
    return core.generate_batch(prompts, [SEEDED, *_others(concurrent)], steps=steps)[0]


def test_seeded_text_is_identical_alone_concurrent_and_at_every_verify_length(target) -> None:
    """fp32: a seeded sampled request gives the same text with speculation off, alone and among 12
    concurrent requests, and with every verify length forced (fixed:1 .. fixed:7, and none), for a
    drafter that couples with the target's noise (the target itself as draft model: long accepted
    blocks) and one that rarely agrees (random DSpark: rejections everywhere)."""
    prompt = [2, 5, 3, 8]
    reference = _seeded_text(_core(target), prompt)
    assert len(set(reference)) > 4
    policies = ("none", *(f"fixed:{k}" for k in range(1, 8)))
    for make, subset in ((lambda: DraftModelDrafter(target.model, 7), policies),
                         (lambda: random_dspark(target, block_size=7, seed=3), ("fixed:2", "fixed:7"))):
        accepted = 0
        for policy in subset:
            core, steps = _core(target, make(), policy), []
            assert _seeded_text(core, prompt, steps=steps) == reference, policy
            accepted += spec_totals(core, steps).num_accepted_tokens
        core = _core(target, make(), "fixed:7")
        assert _seeded_text(core, prompt, concurrent=12) == reference
        assert accepted > 0
    assert _seeded_text(_core(target), prompt, concurrent=12) == reference


def test_wrong_coupling_breaks_the_identity(target, monkeypatch) -> None:
    """Negative control: target noise keyed by the verify row instead of the sequence position (a
    coupling that depends on the verify length) makes the seeded text depend on the schedule."""
    prompt = [2, 5, 3, 8]
    reference = _seeded_text(_core(target), prompt)
    real = verifier_module.coupled_choice
    monkeypatch.setattr(verifier_module, "coupled_choice",
                        lambda processed, keys, positions: real(processed, keys, positions - positions.min()))
    changed = _seeded_text(_core(target, DraftModelDrafter(target.model, 7), "fixed:7"), prompt)
    assert changed != reference


def test_draft_with_other_noise_only_costs_acceptance(target, monkeypatch) -> None:
    """A draft drawn with other noise (not coupled) cannot change a seeded request's text: verification
    emits the target's own keyed choices; only acceptance drops."""
    prompt = [2, 5, 3, 8]
    reference = _seeded_text(_core(target), prompt)
    coupled, coupled_steps = _core(target, DraftModelDrafter(target.model, 7), "fixed:7"), []
    assert _seeded_text(coupled, prompt, steps=coupled_steps) == reference
    real = draft_sampling.coupled_choice
    monkeypatch.setattr(draft_sampling, "coupled_choice",
                        lambda processed, keys, positions: real(processed, keys, positions + 1000))  # other noise
    uncoupled, uncoupled_steps = _core(target, DraftModelDrafter(target.model, 7), "fixed:7"), []
    assert _seeded_text(uncoupled, prompt, steps=uncoupled_steps) == reference
    assert (spec_totals(uncoupled, uncoupled_steps).num_accepted_tokens
            < spec_totals(coupled, coupled_steps).num_accepted_tokens)


@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_distribution_matches_target(seeded: bool) -> None:
    """T = 1 outputs follow the target (rejection sampling for unseeded requests, Gumbel coupling for
    seeded ones), with a DSpark drafter whose strong Markov head makes q far from the target."""
    vocab = 8
    small = tiny_target(vocab=vocab, seed=5, scale=0.25)
    prompt = [2, 5, 3]
    exact = exact_joint(small, prompt, 1.0)
    core = _core(small, random_dspark(small, block_size=3, markov_rank=8, markov_scale=20.0, seed=7), "fixed:3",
                 max_num_batched_tokens=2048, num_kv_blocks=4096, max_num_seqs=512)
    steps: list = []
    stat, cells = chi2(sampled_joint(core, prompt, 3000, 1.0, vocab, seeded=seeded, steps=steps), exact)
    assert spec_totals(core, steps).num_accepted_tokens > 0
    assert stat < chi2_bound(cells), (stat, cells)


# ---------------------------------------------------------------- the logits-mask hook
class ParityMask:
    """A scripted mask: output token i may be one of ``0..5`` when i is even, ``2..7`` when odd. Records
    any verified draft that the mask forbids."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.violations = 0

    def allowed_at(self, index: int) -> torch.Tensor:
        ids = torch.arange(self.vocab)
        return ids <= 5 if index % 2 == 0 else ids >= 2

    def constrained(self, request_id: str) -> bool:
        return True

    def allowed(self, request_id: str, output_token_ids, prefix) -> torch.Tensor:
        if prefix and not bool(self.allowed_at(len(output_token_ids) + len(prefix) - 1)[prefix[-1]]):
            self.violations += 1
        return self.allowed_at(len(output_token_ids) + len(prefix))

    def release(self, request_id: str) -> None:
        return None


@pytest.mark.parametrize("seeded", [False, True])
def test_logits_mask_on_target_and_drafter_is_lossless(seeded: bool) -> None:
    vocab = 8
    small = tiny_target(vocab=vocab, seed=5, scale=0.25)
    prompt = [2, 5, 3]
    mask = ParityMask(vocab)
    exact = exact_joint(small, prompt, 1.0, allowed=mask.allowed_at)
    drafter = random_dspark(small, block_size=3, markov_rank=8, markov_scale=20.0, seed=7)
    args = EngineArgs(dtype="float32", num_kv_blocks=4096, block_size=4, max_num_batched_tokens=2048,
                      max_num_seqs=512, verify_policy="fixed:3")
    core, steps = EngineCore(args, loaded=small, drafter=drafter, logits_mask=mask), []
    stat, cells = chi2(sampled_joint(core, prompt, 3000, 1.0, vocab, seeded=seeded, steps=steps), exact)
    assert stat < chi2_bound(cells), (stat, cells)
    assert mask.violations == 0 and spec_totals(core, steps).num_accepted_tokens > 0
    # negative control: the same mask on the drafter only leaves the target unconstrained
    only_drafter = ParityMask(vocab)
    core = EngineCore(args, loaded=small, drafter=drafter, logits_mask=None)
    core.runner.verifier.mask = None
    core.runner.mask = only_drafter
    bad_stat, bad_cells = chi2(sampled_joint(core, prompt, 3000, 1.0, vocab, seeded=seeded), exact)
    assert bad_stat > chi2_bound(bad_cells), (bad_stat, bad_cells)


# ---------------------------------------------------------------- the controller's state
def test_controller_releases_aborted_requests_and_reports_typed_stats(target) -> None:
    profile = ThroughputProfile((1, 256), (1, 32), ((0.01, 0.02), (0.011, 0.021)), {}, (0.001, 0.004))
    core = _core(target, OracleDrafter(target, block_size=4), "dspark", profile=profile)
    for i in range(4):
        core.add_request(core.make_request(f"a{i}", [3, 4, 5 + i], SamplingParams(temperature=0.0, max_tokens=50)))
    for _ in range(4):
        core.step()
    stats = core.stats()
    assert stats.controller is not None and stats.controller.num_tracked_requests == 4
    assert stats.controller.policy == "dspark" and stats.controller.profile is not None
    assert stats.num_speculative_tokens == 4 and stats.num_running == 4
    for i in range(4):
        core.abort_request(f"a{i}")
    core.step()
    assert core.stats().controller.num_tracked_requests == 0 and len(core.runner.batch) == 0
    assert len(core.runner.drafts) == 0
