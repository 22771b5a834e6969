"""``sparkserve bench`` metric definitions on synthetic timestamps, and its client against a mocked
llama-server-style stream (no server process)."""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import numpy as np
import pytest

from sparkserve.loadtests.bench.client import (
    Target,
    metrics_delta,
    parse_prometheus,
    probe_target,
    request_body,
    stream_request,
)
from sparkserve.loadtests.bench.metrics import (
    RequestRecord,
    aggregate,
    chunk_tokens_from_cumulative,
    estimate_chunk_tokens,
    meets_slos,
    parse_slos,
    summarize,
)
from sparkserve.loadtests.bench.runner import arrival_offsets
from sparkserve.loadtests.bench.workload import PromptPool
from sparkserve.loadtests.prompts import shared_data_dir
from sparkserve.server.metrics import ServerMetrics


def _record(send=0.0, chunks=(0.5, 0.6, 1.0, 1.3), tokens=(1, 1, 2, 3), end=1.4, n_out=None) -> RequestRecord:
    return RequestRecord(send_s=send, chunk_times_s=list(chunks), chunk_tokens=list(tokens), end_s=end,
                         output_tokens=int(sum(tokens)) if n_out is None else n_out, prompt_tokens=10,
                         tokens_exact=True, usage_reported=True)


def test_per_request_definitions() -> None:
    r = _record()
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.4)
    assert r.tpot_s == pytest.approx((1.4 - 0.5) / (7 - 1))  # (E2E - TTFT) / (n_out - 1)
    assert r.itl_s() == pytest.approx([0.1, 0.4, 0.3])  # every gap between content chunks
    # a chunk of k tokens after gap g: k gaps of g / k; the first chunk gets none
    assert r.itl_per_token_s() == pytest.approx([0.1, 0.2, 0.2, 0.1, 0.1, 0.1])


def test_tpot_undefined_below_two_tokens() -> None:
    assert math.isnan(_record(chunks=(0.3,), tokens=(1,), end=0.3).tpot_s)


def test_tokens_per_chunk_from_cumulative_usage() -> None:
    assert chunk_tokens_from_cumulative([2, 3, 3, 6]) == [2, 1, 0, 3]
    assert chunk_tokens_from_cumulative([1, None, 3]) is None  # a chunk without usage: not exact
    assert chunk_tokens_from_cumulative([3, 2]) is None  # decreasing: not cumulative
    assert estimate_chunk_tokens(4, 8) == [2, 2, 2, 2]
    assert estimate_chunk_tokens(3, 3) == [1, 1, 1]


def test_summary_percentiles_match_numpy() -> None:
    rng = random.Random(3)
    xs = [rng.expovariate(10) for _ in range(257)]
    s = summarize(xs)
    for key, p in (("median", 50), ("p90", 90), ("p99", 99)):
        assert s[key] == pytest.approx(float(np.percentile(np.array(xs) * 1000, p)))
    assert s["mean"] == pytest.approx(1000 * sum(xs) / len(xs))
    assert summarize([])["count"] == 0 and math.isnan(summarize([])["mean"])


def test_aggregate_throughput_and_goodput() -> None:
    fast = _record()  # TTFT 500 ms, TPOT 150 ms
    slow = _record(send=0.5, chunks=(2.5, 3.0), tokens=(1, 1), end=3.1)  # TTFT 2000 ms
    failed = RequestRecord(send_s=0.0, end_s=0.1, ok=False, error="HTTP 500")
    m = aggregate([fast, slow, failed], duration_s=4.0, slos=parse_slos(["ttft:1000", "tpot:200"]))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_output_tokens"] == 9
    assert m["output_throughput"] == pytest.approx(9 / 4.0)
    assert m["request_throughput"] == pytest.approx(2 / 4.0)
    assert m["goodput"]["good_requests"] == 1  # slow misses the TTFT SLO
    assert m["goodput"]["request_goodput"] == pytest.approx(1 / 4.0)
    assert m["goodput"]["request_goodput"] <= m["request_throughput"]
    assert m["ttft_ms"]["max"] == pytest.approx(2000)
    assert m["itl_ms"]["count"] == 4  # 3 + 1 gaps
    assert m["tokens_per_chunk"]["mean"] == pytest.approx(9 / 6)
    assert m["per_user_tokens_per_s"]["max"] == pytest.approx(1 / fast.tpot_s)


def test_slo_parsing_and_edges() -> None:
    assert parse_slos(["ttft:500", "TPOT:50", "e2e:3000"]) == {"ttft": 500, "tpot": 50, "e2e": 3000}
    for bad in (["itl:5"], ["ttft:abc"], ["ttft:0"], ["ttft"]):
        with pytest.raises(ValueError):
            parse_slos(bad)
    one_token = _record(chunks=(0.2,), tokens=(1,), end=0.2)
    assert meets_slos(one_token, {"tpot": 1.0})  # no TPOT: meets a TPOT SLO (as vLLM)
    assert not meets_slos(one_token, {"ttft": 100.0})


def test_arrivals() -> None:
    assert arrival_offsets(5, math.inf, 1.0, random.Random(0)) == [0.0] * 5
    for burstiness in (0.5, 1.0, 4.0):
        t = arrival_offsets(4001, 20.0, burstiness, random.Random(1))
        gaps = np.diff(t)
        assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.1)
        # Gamma(k, 1/(rate k)): coefficient of variation 1 / sqrt(k)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.15)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 1.0, random.Random(0))


@pytest.mark.skipif(not (shared_data_dir() / "prompts").is_dir(), reason="shared prompt data not found (SPARKSERVE_DATA)")
def test_pool_hands_out_fresh_prompts_until_exhausted() -> None:
    pool = PromptPool("mtbench", max_tokens=8, seed=0, multi_turn=True)
    first = pool.take(50)
    second = pool.take(30)
    texts = [c.turns[0] for c in first + second]
    assert len(set(texts)) == 80 and not any(c.reused for c in first + second)
    assert all(len(c.turns) == 2 for c in first)
    assert pool.take(1)[0].reused and pool.reused == 1
    spec = PromptPool("specbench", max_tokens=8, category="translation").take(3)
    assert len(spec) == 3
    with pytest.raises(ValueError):
        PromptPool("specbench", max_tokens=8, category="no-such-category")
    mixed = PromptPool("mtbench+gsm8k", max_tokens=8).take(200)
    by_category = PromptPool("specbench:summarization+specbench:rag", max_tokens=8).take(160)
    assert sum(c.turns[0].startswith("Summarize:") for c in by_category) == 80  # 80 per category, interleaved
    assert by_category[0].turns[0].startswith("Summarize:") and not by_category[1].turns[0].startswith("Summarize:")
    assert len({c.turns[0] for c in mixed}) == 200 and not any(c.reused for c in mixed)
    rnd = PromptPool("random", max_tokens=8, random_input_len=50, random_output_len=20, random_range_ratio=0.5)
    convs = rnd.take(20)
    assert all(25 <= len(c.turns[0].split()) <= 75 and 10 <= c.max_tokens <= 30 for c in convs)


def test_request_body_options() -> None:
    t = Target("a", "http://x/v1", model="m", ignore_eos=True, continuous_usage=True)
    body = request_body(t, "chat", [{"role": "user", "content": "hi"}], 5, 0.0)
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["ignore_eos"] is True and body["messages"][0]["content"] == "hi"
    plain = request_body(Target("b", "http://x/v1", model="m"), "completions", [{"role": "user", "content": "hi"}], 5, 0.0)
    assert plain["prompt"] == "hi" and "ignore_eos" not in plain
    assert plain["stream_options"] == {"include_usage": True}


def test_metrics_delta_reads_server_metric_names() -> None:
    """The scrape parses what server/metrics.py exports (names stay in sync)."""
    m = ServerMetrics("model", num_speculative_tokens=3)
    before = parse_prometheus(m.render()[0].decode())
    m.generation_tokens.inc(40)
    m.spec_num_drafts.inc(10)
    m.spec_num_draft_tokens.inc(24)
    m.spec_num_accepted_tokens.inc(12)
    for k, (acc, ver) in enumerate(((7, 10), (4, 8), (1, 6))):
        m.spec_accepted_per_pos[k].inc(acc)
        m.spec_verified_per_pos[k].inc(ver)
    for budget in (6, 18):
        m.spec_verify_budget.observe(budget)
    d = metrics_delta(before, parse_prometheus(m.render()[0].decode()))
    assert d["generation_tokens"] == 40
    assert d["spec_accepted_length"] == pytest.approx(1 + 12 / 10)
    assert d["spec_acceptance_rate"] == pytest.approx(12 / 24)
    assert d["spec_acceptance_per_position"] == pytest.approx([0.7, 0.5, 1 / 6])
    assert d["spec_verify_budget_mean"] == pytest.approx(12)
    assert metrics_delta(None, before) is None


def _llama_style_app(request: httpx.Request) -> httpx.Response:
    """A stand-in for llama.cpp's llama-server: usage on the chunk with finish_reason (no final
    choices-less chunk), no per-chunk usage, and a 400 for a field it does not know (here
    continuous_usage_stats, to exercise the probe's fallback)."""
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"object": "list", "data": [{"id": "smollm2", "object": "model"}]})
    body = json.loads(request.content)
    if "continuous_usage_stats" in body.get("stream_options", {}):
        return httpx.Response(400, json={"error": {"message": "unknown field", "type": "invalid_request_error"}})
    n = body["max_tokens"] if body.get("ignore_eos") else 2
    pieces = [f" w{i}" for i in range(n)]
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                   "usage": {"completion_tokens": n, "prompt_tokens": 9, "total_tokens": n + 9},
                   "timings": {"predicted_n": n}})
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_llama_server_style_stream_and_probe() -> None:
    async def go():
        transport = httpx.MockTransport(_llama_style_app)
        target = Target("llama", "http://peer/v1")
        await probe_target(target, "chat", True, client=httpx.AsyncClient(transport=transport))
        async with httpx.AsyncClient(transport=transport) as client:
            body = request_body(target, "chat", [{"role": "user", "content": "hi"}], 5, 0.0)
            record = await stream_request(client, target, "chat", body, 10)
        return target, record

    target, record = asyncio.run(go())
    assert target.model == "smollm2"
    assert target.ignore_eos and target.probe["ignore_eos_honoured"] and not target.continuous_usage
    assert record.ok and record.output_tokens == 5 and record.prompt_tokens == 9  # usage from the finish chunk
    assert len(record.chunk_times_s) == 5 and not record.tokens_exact and record.chunk_tokens == [1.0] * 5
