"""Prefix caching through the engine (fp32): greedy outputs with the cache equal those without it (by the
near-tie rule, DESIGN.md section 7) for a shared system prompt, multi-turn chats, concurrent requests
sharing a prefix, a prefix shared across preemptions and eviction under KV pressure, with and without
the drafter; cached tokens are reported; the real model through HTTP reports them in usage and metrics."""

from __future__ import annotations

import pytest

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.tiny import random_dspark, tiny_target

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=1)


def _core(target, caching: bool, drafter: bool, **kw) -> EngineCore:
    args = EngineArgs(dtype="float32", num_kv_blocks=kw.pop("num_kv_blocks", 256), block_size=4,
                      max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=caching,
                      drafter=None if drafter else "none", verify_policy="fixed:3", **kw)
    return EngineCore(args, loaded=target, drafter=random_dspark(target, block_size=3, seed=4) if drafter else None)


def _run(core: EngineCore, prompts: list[list[int]], prefix: str) -> tuple[list[list[int]], list[int]]:
    """Generate; returns the outputs and each request's reported cached tokens."""
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        core.add_request(core.make_request(rid, prompt, GREEDY))
    tokens = {rid: [] for rid in ids}
    cached = dict.fromkeys(ids, 0)
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
        core.scheduler.block_manager.check_integrity()
    return [tokens[r] for r in ids], [cached[r] for r in ids]


def _same(target, prompts, got, want, label) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_or_near_tie(g, w, top2_gap_fn(target.model, prompts[i], w), label=f"{label}[{i}]")


@pytest.mark.parametrize("drafter", [False, True])
def test_shared_system_prompt_and_multi_turn(target, drafter: bool) -> None:
    system = [(7 * i) % 57 + 2 for i in range(37)]
    prompts = [system + [40 + i, 3, 9] for i in range(6)]
    reference = _core(target, False, drafter)
    want, _ = _run(reference, prompts, "ref")
    core = _core(target, True, drafter)
    warm, warm_cached = _run(core, prompts[:1], "warm")
    got, cached = _run(core, prompts[1:], "hit")  # concurrent requests sharing the cached prefix
    _same(target, prompts, warm + got, want, "shared")
    assert warm_cached == [0] and all(c == 36 for c in cached)  # 9 full blocks of the 37-token prefix
    stats = core.stats()
    assert stats.prefix_cache_hits == 5 * 36 and stats.prefix_cache_queries == sum(len(p) for p in prompts)
    # second turn: the first answer was cached while it was generated (decode blocks included)
    second = [prompts[0] + warm[0] + [5, 6, 7]]
    want2, _ = _run(reference, second, "ref2")
    got2, cached2 = _run(core, second, "turn2")
    _same(target, second, got2, want2, "turn2")
    assert cached2[0] >= (len(prompts[0]) + len(warm[0]) - 1) // 4 * 4 - 4


@pytest.mark.parametrize("drafter", [False, True])
def test_prefix_across_preemption_and_eviction_under_pressure(target, drafter: bool) -> None:
    shared = [(5 * i) % 53 + 3 for i in range(21)]
    prompts = [shared + [i + 2] for i in range(8)] + [[(11 * i) % 50 + 2 for i in range(30)] for _ in range(2)]
    want, _ = _run(_core(target, False, drafter), prompts, "ref")
    core = _core(target, True, drafter, num_kv_blocks=28, shuffle_blocks=True)
    got, cached = _run(core, prompts, "p")
    _same(target, prompts, got, want, "pressure")
    bm = core.scheduler.block_manager
    assert core.scheduler.num_preemptions_total > 0 and bm.num_evictions > 0 and any(cached)
    assert bm.num_free_blocks == bm.num_total_blocks and core.scheduler.kv_cache_usage == 0.0


def test_http_usage_reports_cached_tokens_and_metrics_count_them(smollm2) -> None:
    """Real SmolLM2 (fp32) through HTTP: the second turn of a chat reports cached prompt tokens in
    ``usage.prompt_tokens_details`` and in the prefix-cache metrics; its text equals a cache-off engine's."""
    from sparkserve.engine.async_engine import AsyncEngine
    from sparkserve.server.metrics_glue import build_metrics
    from sparkserve.testing.server_harness import run_server

    def engine(caching: bool) -> AsyncEngine:
        args = EngineArgs(dtype="float32", num_kv_blocks=256, drafter="none", enable_prefix_caching=caching)
        return AsyncEngine(EngineCore(args, loaded=smollm2))

    turn1 = [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
             {"role": "user", "content": "What is the capital of France?"}]
    texts = {}
    for caching in (True, False):
        eng = engine(caching)
        metrics = build_metrics(eng, 1024)
        with run_server(eng, served_model_name="smol", metrics=metrics) as server:
            client = server.openai()
            first = client.chat.completions.create(model="smol", messages=turn1, max_tokens=12, temperature=0.0)
            turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And of Italy?"}]
            second = client.chat.completions.create(model="smol", messages=turn2, max_tokens=12, temperature=0.0)
            texts[caching] = (first.choices[0].message.content, second.choices[0].message.content)
            cached = second.usage.prompt_tokens_details.cached_tokens
            if caching:
                assert first.usage.prompt_tokens_details.cached_tokens == 0
                assert cached >= 16 and cached < second.usage.prompt_tokens
                body = server.http().get("/metrics").text
                hits = [line for line in body.splitlines() if line.startswith("sparkserve:prefix_cache_hits_total")]
                assert hits and float(hits[0].split()[-1]) == cached
            else:
                assert cached == 0
    assert texts[True] == texts[False]
