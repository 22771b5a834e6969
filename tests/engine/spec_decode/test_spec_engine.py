"""Speculative decoding through the real engine on tiny random targets (fp32).

Greedy losslessness (DESIGN.md section 7) for random DSpark / DFlash drafters and the oracle drafter
(every accept length 0..gamma), at batch 1, concurrently and under preemption; stops inside an
accepted block; distributional losslessness with a negative control; the lazy drafter context feed against
the eager one.
"""

from __future__ import annotations

import random

import pytest
import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.spec_decode.draft_model import DraftModelDrafter
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.spec_records import generate_recorded, spec_totals, step_recorded
from sparkserve.testing.spec_stats import chi2, chi2_bound, exact_joint, sampled_joint
from sparkserve.testing.tiny import OracleDrafter, random_dspark, tiny_target

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return tiny_target()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(2, 61, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (20,), generator=gen)]


def _core(target, drafter=None, profile=None, **kw) -> EngineCore:
    # The speculation guard times real steps (wall clock): off here, where acceptance counts are asserted.
    kw.setdefault("spec_guard", False)
    args = EngineArgs(dtype="float32", num_kv_blocks=kw.pop("num_kv_blocks", 256), block_size=4,
                      max_num_batched_tokens=kw.pop("max_num_batched_tokens", 128), max_num_seqs=kw.pop("max_num_seqs", 32),
                      drafter="none" if drafter is None else None, verify_policy=kw.pop("verify_policy", "fixed:7"),
                      **kw)
    return EngineCore(args, loaded=target, drafter=drafter, profile=profile)


def _greedy(n=MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline(target, prompts) -> list[list[int]]:
    core = _core(target)
    return core.generate_batch(prompts, _greedy())


def _check(target, prompts, baseline, outputs, label) -> None:
    for i, out in enumerate(outputs):
        assert_same_or_near_tie(out, baseline[i], top2_gap_fn(target.model, prompts[i], baseline[i]), label=f"{label}[{i}]")


_DRAFTERS = {
    "oracle": lambda target, seed: OracleDrafter(target, block_size=4, seed=seed),
    "dspark": lambda target, seed: random_dspark(target, block_size=4, seed=seed),
    "dflash": lambda target, seed: random_dspark(target, block_size=4, markov_rank=0, confidence=False, seed=seed),
    # the target itself as the draft model: high acceptance, independent KV (re-prefilled)
    "draft-model": lambda target, seed: DraftModelDrafter(target.model, num_draft_tokens=4),
}


@pytest.mark.parametrize("kind", ["oracle", "dspark", "dflash", "draft-model"])
def test_greedy_lossless_concurrent(target, prompts, baseline, kind) -> None:
    drafter = _DRAFTERS[kind](target, 1)
    core = _core(target, drafter)
    outputs, stats = generate_recorded(core, prompts, _greedy())
    _check(target, prompts, baseline, outputs, kind)
    assert stats.num_draft_tokens > 0
    if kind == "draft-model":
        assert stats.accepted_length > 3.0, stats  # drafting with the target: nearly all accepted
    if kind == "oracle":
        # every accept length happens: positions 0..gamma-1 all see both accepts and rejects
        assert all(0 < a < v for a, v in zip(stats.num_accepted_per_pos, stats.num_verified_per_pos, strict=False)), stats
        assert stats.accepted_length > 1.5


@pytest.mark.parametrize("kind", ["oracle", "dspark", "dflash", "draft-model"])
def test_greedy_lossless_batch1_and_preemption(target, prompts, baseline, kind) -> None:
    make = _DRAFTERS[kind]
    core = _core(target, make(target, 2))
    for i in range(len(prompts)):  # every prompt alone (batch 1)
        out = core.generate_batch([prompts[i]], _greedy(), request_prefix=f"solo{i}")[0]
        _check(target, [prompts[i]], [baseline[i]], [out], f"{kind}-batch1")
    small = _core(target, make(target, 3), num_kv_blocks=40, shuffle_blocks=True)
    outputs = small.generate_batch(prompts, _greedy())
    assert small.scheduler.num_preemptions_total > 0
    _check(target, prompts, baseline, outputs, f"{kind}-preempt")
    assert small.scheduler.kv_cache_usage == 0.0


@pytest.mark.parametrize("kind", ["oracle", "dspark"])
def test_greedy_lossless_with_drafting_skipped(target, prompts, baseline, kind, monkeypatch) -> None:
    """Requests that skip the drafter for some steps (the drafting gate) keep growing the drafter's
    context and draft correctly when they resume: outputs equal no speculation."""
    core = _core(target, _DRAFTERS[kind](target, 4))
    rng = random.Random(0)
    monkeypatch.setattr(core.controller, "select_drafting",
                        lambda requests, context: [rng.random() < 0.5 for _ in requests])
    drafting = []
    outputs = []
    ids = [f"g{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        core.add_request(core.make_request(rid, prompt, _greedy()))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    steps: list = []
    while core.has_unfinished_requests():
        for out in step_recorded(core, steps):
            tokens[out.request_id].extend(out.new_token_ids)
        drafting.append((core.last_step.scheduler.num_drafting, core.last_step.scheduler.num_decode_requests))
    outputs = [tokens[rid] for rid in ids]
    _check(target, prompts, baseline, outputs, f"{kind}-gated")
    stats = spec_totals(core, steps)
    assert any(0 < d < r for d, r in drafting) and stats.num_accepted_tokens > 0
    if kind == "oracle":
        assert stats.accepted_length > 1.5  # resumed drafts are still the oracle's good ones


def test_drafting_gate_stops_drafting_when_the_drafter_costs_more_than_it_saves(target, prompts, baseline) -> None:
    """A profile where one request's drafter forward takes 10x a target step: after each request's
    first (unknown-quality) block nobody drafts, and the output is unchanged."""
    profile = ThroughputProfile((1, 256), (1, 32), ((11.0, 330.0), (12.0, 331.0)), {}, (10.0, 320.0))
    core = _core(target, _DRAFTERS["oracle"](target, 5), verify_policy="dspark", profile=profile)
    steps: list = []
    outputs = core.generate_batch(prompts, _greedy(), steps=steps)
    _check(target, prompts, baseline, outputs, "gate-expensive")
    assert spec_totals(core, steps).num_draft_tokens <= 4 * len(prompts)  # at most the first block of each
    assert steps[-1].scheduler.num_drafting == 0
    core_off = _core(target, _DRAFTERS["oracle"](target, 5), verify_policy="dspark", profile=profile, draft_gate=False)
    _, stats_off = generate_recorded(core_off, prompts, _greedy())
    assert stats_off.num_draft_tokens > 4 * len(prompts)


def test_stop_inside_accepted_block(target, prompts, baseline) -> None:
    # Stop at the baseline's 6th token: with an error-free oracle it lands inside an accepted block.
    i = next(k for k, out in enumerate(baseline) if out[5] not in out[:5])
    stop = baseline[i][5]
    core = _core(target, OracleDrafter(target, block_size=4, seed=4, error_rate=0.0))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=(stop,))
    request = core.make_request("s", prompts[i], params)
    core.add_request(request)
    tokens, finish, steps = [], None, []
    while core.has_unfinished_requests():
        for out in step_recorded(core, steps):
            tokens.extend(out.new_token_ids)
            finish = out.finish_reason or finish
    assert tokens == baseline[i][:6] and finish == "stop"
    stats = spec_totals(core, steps)
    assert stats.num_drafts >= 1 and stats.num_accepted_tokens <= len(tokens) - 1  # nothing past the stop
    # max_tokens cap applied after the stop check: a stop exactly at the cap is "stop"
    core2 = _core(target, OracleDrafter(target, block_size=4, seed=4, error_rate=0.0))
    capped = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(stop,))
    req2 = core2.make_request("c", prompts[i], capped)
    core2.add_request(req2)
    finishes = [o.finish_reason for _ in range(50) if core2.has_unfinished_requests() for o in core2.step()]
    assert finishes[-1] == "stop"


def test_sampling_distribution_matches_target(target) -> None:
    vocab = 8
    small = tiny_target(vocab=vocab, seed=5, scale=0.25)
    prompt = [2, 5, 3]
    temperature = 1.0
    exact = exact_joint(small, prompt, temperature)
    n = 4000
    # DSpark drafter with a strong Markov head: its q differs a lot from softmax(U).
    good = _core(small, random_dspark(small, block_size=3, markov_rank=8, markov_scale=20.0, seed=7),
                 max_num_batched_tokens=2048, max_num_seqs=512, num_kv_blocks=4096)
    steps: list = []
    stat, cells = chi2(sampled_joint(good, prompt, n, temperature, vocab, steps=steps), exact)
    assert spec_totals(good, steps).num_draft_tokens > 0
    assert stat < chi2_bound(cells), (stat, cells)
    print(f"chi2 good {stat:.1f} over {cells} cells (bound {chi2_bound(cells):.1f})")

    # Negative control: verification with softmax(U) (no Markov correction) instead of the q sampled from.
    bad_drafter = random_dspark(small, block_size=3, markov_rank=8, markov_scale=20.0, seed=7)
    real_sample_block = bad_drafter.sample_block

    def wrong_q(h, base_logits, batch):
        base = base_logits.clone()  # U: [R, B, V] (sample_block builds Z in place in it)
        out = real_sample_block(h, base_logits, batch)
        rows = torch.tensor(batch.free_rows)
        temps = batch.sampling.temperature[rows].clamp_min(1e-5)[:, None, None]
        out.draft_probs = torch.softmax(base[rows].float() / temps, -1)
        return out

    bad_drafter.sample_block = wrong_q
    bad = _core(small, bad_drafter, max_num_batched_tokens=2048, max_num_seqs=512, num_kv_blocks=4096)
    bad_stat, bad_cells = chi2(sampled_joint(bad, prompt, n, temperature, vocab), exact)
    print(f"chi2 wrong-q {bad_stat:.1f} over {bad_cells} cells")
    assert bad_stat > chi2_bound(bad_cells), (bad_stat, bad_cells)


def test_survival_check_counts_match_the_engine(target, prompts) -> None:
    """benchmarks.survival_check.run: its per-position counts add up to its totals (drafts verified, drafts
    accepted, from the steps' records), and predictions are prefix survivals in [0, 1]."""
    from sparkserve.benchmarks.survival_check import run

    core = _core(target, _DRAFTERS["dspark"](target, 6))
    res = run(core, prompts[:5], 0.0, 12)
    rows = res["by_position"]
    assert res["verified"] == sum(r["n"] for r in rows) > 0
    assert res["realised_accepted"] == round(sum(r["realised"] * r["n"] for r in rows)) <= res["verified"]
    assert all(0.0 <= r["predicted"] <= 1.0 and 0.0 <= r["realised"] <= 1.0 for r in rows)
    assert [r["n"] for r in rows] == sorted((r["n"] for r in rows), reverse=True)  # prefixes: fewer deeper


def _context(core: EngineCore, request_id: str, num_rows: int) -> torch.Tensor:
    """The drafter's cached keys and values of a request's first ``num_rows`` positions: [layers, 2, Hkv, N, hd]."""
    blocks = torch.tensor(core.runner.batch.requests[request_id].block_ids, dtype=torch.int64)
    pos = torch.arange(num_rows)
    block, offset = blocks[pos // 4], pos % 4
    return torch.stack([torch.stack([cache[:, block, offset] for cache in layer])
                        for layer in core.runner.speculator.kv_caches])


def _lazy_core(target, lazy: bool) -> EngineCore:
    return _core(target, random_dspark(target, block_size=4, seed=5), verify_policy="fixed:3", max_num_seqs=8,
                 lazy_drafter_context=lazy)


def test_lazy_catch_up_gives_the_drafter_the_eager_context(target, prompts) -> None:
    """The lazy drafter context feed (engine/spec_decode/context_feed.py) against the eager feed: two engines in
    lockstep with the same random drafting decisions; whenever a request drafts, the drafter's cache holds the
    same keys and values at every position before its anchor in both (the catch-up gives the drafter the
    context eager feeding would have), and the outputs are equal."""
    prompts = prompts[:8]
    cores = {lazy: _lazy_core(target, lazy) for lazy in (False, True)}
    captured: dict[bool, list] = {False: [], True: []}
    for lazy, core in cores.items():
        rng = random.Random(0)
        core.controller.select_drafting = lambda requests, context, rng=rng: [rng.random() < 0.3 for _ in requests]
        execute = core.runner.execute
        core.runner.execute = lambda out, execute=execute, lazy=lazy: captured[lazy].append(out) or execute(out)
        for i, prompt in enumerate(prompts):
            core.add_request(core.make_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=24,
                                                                             ignore_eos=True)))
    tokens: dict[bool, dict[str, list[int]]] = {False: {}, True: {}}
    checked = pending_seen = 0
    while cores[False].has_unfinished_requests():
        for lazy, core in cores.items():
            for out in core.step():
                tokens[lazy].setdefault(out.request_id, []).extend(out.new_token_ids)
        out = captured[True][-1]
        assert [s.request_id for s in out.seqs] == [s.request_id for s in captured[False][-1].seqs]
        pending_seen += cores[True].runner.speculator.feed.num_pending_rows > 0
        for seq in out.seqs:
            if seq.sample and seq.draft:  # drafted after this step: it read every row before its anchor
                request = cores[True].scheduler._requests.get(seq.request_id)
                if request is None:
                    continue
                rows = request.num_computed_tokens
                torch.testing.assert_close(_context(cores[True], seq.request_id, rows),
                                           _context(cores[False], seq.request_id, rows), rtol=1e-5, atol=1e-5)
                checked += 1
    assert tokens[True] == tokens[False]
    assert checked > 20 and pending_seen > 5  # requests drafted after skipping steps, rows were pending


def test_lazy_context_drafting_every_step_same_drafts_and_acceptance(target, prompts) -> None:
    """Drafting every step, the lazy and the eager feed make the same drafts and accept the same counts."""
    params = _greedy(16)
    (out_eager, stats_eager), (out_lazy, stats_lazy) = (generate_recorded(_lazy_core(target, lazy), prompts[:8], params)
                                                        for lazy in (False, True))
    assert out_lazy == out_eager
    assert stats_lazy.num_draft_tokens == stats_eager.num_draft_tokens > 0
    assert stats_lazy.num_accepted_per_pos == stats_eager.num_accepted_per_pos
