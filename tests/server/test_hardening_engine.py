"""The failure kinds of inference servers (issue 16), each pinned on the real SmolLM2-135M through
HTTP, with speculation off and on (the shipped DSpark drafter, dspark policy, drafting gate off so
steps emit several tokens). One server per mode is shared by the tests; small token counts keep the
whole module within a couple of minutes on 2 cores.

1 stream endings, 2 text integrity, 3 stop strings / EOS in a block, 4 disconnects, 5 KV exhaustion,
6 limits, 7 overload, 8 faults, 9 fairness.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from sparkserve.engine.async_engine import AsyncEngine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.server.metrics import ServerMetrics
from sparkserve.server.metrics_glue import build_metrics
from sparkserve.testing.server_harness import RunningServer, run_server, wait_for

MODEL = "smol"
PROFILE = Path(__file__).resolve().parents[1] / "data" / "profile_small.json"
BUDGET = 128  # small: a 768-token prompt takes several steps (fairness), 8 decode rows + drafts fit
POISON = 13  # a token id only the fault tests put in a prompt (<jupyter_code>)


@dataclass
class Real:
    server: RunningServer
    engine: AsyncEngine
    metrics: ServerMetrics
    mode: str
    cache: dict[str, object] = field(default_factory=dict)

    def http(self, **kwargs: object) -> httpx.Client:
        return self.server.http(**kwargs)

    def gauge(self, name: str, **labels: str) -> float:
        return sample(self.metrics, name, **labels)

    def idle(self) -> bool:
        """Gauges at their idle values and every KV block free (no step needed to get there)."""
        blocks = self.engine.core.scheduler.block_manager
        return (self.gauge("num_requests_running") == 0 and self.gauge("num_requests_waiting") == 0
                and self.gauge("kv_cache_usage_perc") == 0.0 and blocks.num_free_blocks == self.engine.core.num_blocks)


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float:
    """A metric's current value (0 for a labelled series not created yet)."""
    value = metrics.registry.get_sample_value(f"sparkserve:{name}", {"model_name": metrics.model_name, **labels})
    assert value is not None or labels, name
    return value or 0.0


def _engine(smollm2, spec: bool, **overrides: object) -> AsyncEngine:
    values: dict[str, object] = dict(
        dtype="float32", drafter=None if spec else "none", verify_policy="dspark" if spec else None,
        draft_gate=False, num_kv_blocks=256, block_size=16, max_num_batched_tokens=BUDGET, max_num_seqs=8,
        max_waiting_requests=8, max_waiting_tokens=2400, long_prefill_token_threshold=64,
    )
    values.update(overrides)
    args = EngineArgs(**values)  # type: ignore[arg-type]
    core = EngineCore(args, loaded=smollm2, profile=ThroughputProfile.load(PROFILE) if spec else None)
    return AsyncEngine(core, args.max_waiting_requests, args.max_waiting_tokens)


@pytest.fixture(scope="module", params=["spec-off", "spec-on"])
def real(request, smollm2) -> Iterator[Real]:
    engine = _engine(smollm2, request.param == "spec-on")
    metrics = build_metrics(engine, BUDGET)
    with run_server(engine, served_model_name=MODEL, metrics=metrics, max_choices=4) as server:
        yield Real(server, engine, metrics, request.param)


def chat_body(content: str, **fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0.0, **fields}


def sse_payloads(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]


def stream_chunks(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a stream, checking it ends with ``[DONE]`` after an error event or chunks."""
    r = http.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    data = sse_payloads(r.text)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def stream_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


# ---- 1. stream endings ----------------------------------------------------------------------------

def test_1_stream_endings(real: Real) -> None:
    with real.http() as http:
        chunks = stream_chunks(http, "/v1/chat/completions", chat_body("Name a color.", max_tokens=6,
                                                                      stream_options={"include_usage": True}))
        *choice_chunks, usage = chunks
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
        assert all(c["choices"] and c.get("usage") is None for c in choice_chunks)
        assert choice_chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
        chunks = stream_chunks(http, "/v1/completions", {"model": MODEL, "prompt": "One, two,", "max_tokens": 4})
        assert all(c["choices"] for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---- 2. text integrity -------------------------------------------------------------------------------

def test_2_multibyte_text_never_broken_and_stream_equals_non_stream(real: Real) -> None:
    body = {"model": MODEL, "prompt": "Party: 🎉🎉🎉🎉🎉🎉🎉🎉", "max_tokens": 12, "temperature": 0.0}
    with real.http() as http:
        whole = http.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]
        chunks = stream_chunks(http, "/v1/completions", body)
    tokens = whole["logprobs"]["tokens"]
    assert any("\ufffd" in t for t in tokens), tokens  # some emitted tokens are parts of a character
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "\ufffd" not in whole["text"] and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == whole["text"] and "🎉" in whole["text"]


# ---- 3. stop strings and EOS ----------------------------------------------------------------------------

def test_3_stop_string_spanning_tokens_and_coinciding_with_max_tokens(real: Real) -> None:
    with real.http() as http:
        body = chat_body("What is the capital of France?", max_tokens=8, logprobs=True)
        reply = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        tokens = [t["token"] for t in reply["logprobs"]["content"]]
        text = reply["message"]["content"]
        k = next(i for i in range(1, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
        stop = tokens[k][-2:] + tokens[k + 1][:2]  # spans the boundary between tokens k and k + 1
        cut = text.find(stop)
        assert cut == len("".join(tokens[: k + 1])) - 2, (tokens, stop)
        for max_tokens in (8, k + 2):  # k + 2: the token completing the stop string is the last allowed
            fields = {"max_tokens": max_tokens, "stop": [stop], "stream_options": {"include_usage": True}}
            chunks = stream_chunks(http, "/v1/chat/completions", chat_body(body["messages"][0]["content"], **fields))
            assert stream_text(chunks) == text[:cut]
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
            assert chunks[-1]["usage"]["completion_tokens"] == k + 2
            whole = http.post("/v1/chat/completions", json=chat_body(body["messages"][0]["content"],
                                                                     max_tokens=max_tokens, stop=stop)).json()
            choice = whole["choices"][0]
            assert choice["message"]["content"] == text[:cut] and choice["finish_reason"] == "stop"
            assert choice["stop_reason"] == stop


def test_3_eos_ends_the_request_where_it_is(real: Real) -> None:
    with real.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body("Say hello.", max_tokens=40, logprobs=True)).json()
    choice = r["choices"][0]
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    assert choice["finish_reason"] == "stop" and tokens[-1] == "<|im_end|>" and "<|im_end|>" not in tokens[:-1]
    assert r["usage"]["completion_tokens"] == len(tokens) and "<|im_end|>" not in choice["message"]["content"]


# ---- 4. disconnects ------------------------------------------------------------------------------------

def test_4_disconnect_storm_frees_everything_at_once(real: Real) -> None:
    """12 clients (8 run, 4 queue; streaming and not) leave mid-way: within a step nothing runs,
    nothing waits, every KV block is free, and the gauges say so without any later request."""
    aborted = real.gauge("request_success_total", finished_reason="abort")
    body = chat_body("Count from one to one hundred.", max_tokens=400, temperature=0.7, ignore_eos=True)  # none ends early
    with real.http() as http, ExitStack() as streams:
        for i in range(10):  # the response head comes once the request is admitted
            streams.enter_context(http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}))
            if i == 7:
                assert wait_for(lambda: real.engine.num_running == 8, timeout_s=60)
        with real.http(timeout=0.5) as short:
            for _ in range(2):
                with pytest.raises(httpx.ReadTimeout):
                    short.post("/v1/chat/completions", json=body)
        # the 2 timed-out ones leave the queue by the next step
        assert wait_for(lambda: real.engine.num_running == 8 and real.engine.num_waiting == 2, timeout_s=10)
    start = time.monotonic()
    assert wait_for(real.idle, timeout_s=10), (real.gauge("num_requests_running"), real.gauge("kv_cache_usage_perc"))
    assert time.monotonic() - start < 5
    # (the handlers record their aborts as they unwind: give a loaded CI machine time)
    assert wait_for(lambda: real.gauge("request_success_total", finished_reason="abort") == aborted + 12, timeout_s=30)


# ---- 5. KV exhaustion ----------------------------------------------------------------------------------

def test_5_kv_exhaustion(smollm2, real: Real) -> None:
    """On a 6-block cache (96 tokens): a request that can never fit is a 400 at admission naming the
    right field; three concurrent requests that fit when admitted but not at full length preempt one
    another and still give the texts they give on the shared server, where they all fit."""
    engine = _engine(smollm2, real.mode == "spec-on", num_kv_blocks=6)
    metrics = build_metrics(engine, BUDGET)
    # Short prompts (1 block each: all three are admitted together); 40 tokens each: 4 blocks each at the
    # end, so whichever reaches position 33 first needs a 7th block while the others hold 2 each.
    starts = ("Once upon a time, in a small village,", "One, two, three, four,", "Paris is the capital of")
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 40, "temperature": 0.0, "ignore_eos": True} for p in starts]

    def ask_all(http: httpx.Client) -> list[dict]:
        results: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, http.post("/v1/completions", json=bodies[i]).json())) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        return [results[i] for i in range(3)]

    with real.http() as http:
        roomy = ask_all(http)
    with run_server(engine, served_model_name=MODEL, metrics=metrics) as server, server.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 140, "max_tokens": 1})
        assert r.status_code == 400 and (r.json()["error"]["code"], r.json()["error"]["param"]) == (
            "kv_cache_too_small", "prompt")
        r = http.post("/v1/chat/completions", json=chat_body("hi", max_tokens=300))
        assert r.status_code == 400 and (r.json()["error"]["code"], r.json()["error"]["param"]) == (
            "kv_cache_too_small", "max_tokens")
        tight = ask_all(http)
        assert sample(metrics, "num_preemptions_total") > 0
        texts = [[r["choices"][0]["text"] for r in results] for results in (roomy, tight)]
        assert sum(a == b for a, b in zip(*texts, strict=True)) >= 2  # a near-tie may part one (sparkserve/testing/exactness.py)
        assert all(r["usage"]["completion_tokens"] == 40 for r in tight)  # none hung, failed or was cut
        assert wait_for(lambda: engine.core.scheduler.block_manager.num_free_blocks == 6)


# ---- 6. limits -------------------------------------------------------------------------------------------

LIMITS = [  # (fields, param, the limit stated in the message)
    ({"max_tokens": 9000}, "max_tokens", "8192"),
    ({"n": 5}, "n", "<= 4"),
    ({"logit_bias": {"49152": 1}}, "logit_bias", "49152"),
    ({"stop": ["a"] * 17}, "stop", "16"),
    ({"seed": 2**63}, "seed", "9223372036854775807"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
]


def test_6_limits_are_400_stating_the_limit(real: Real) -> None:
    with real.http() as http:
        for fields, param, limit in LIMITS:
            r = http.post("/v1/chat/completions", json=chat_body("hi", **fields))
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param and limit in error["message"], error
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": [[1] * 8200]})
        assert r.status_code == 400 and "8192" in r.json()["error"]["message"]


# ---- 7. overload -----------------------------------------------------------------------------------------

def test_7_overload_429_before_any_byte(real: Real) -> None:
    body = chat_body("Count from one to one hundred.", max_tokens=400, temperature=0.7, stream=True)
    with real.http() as http, ExitStack() as streams:
        for _ in range(8):  # 8 running
            streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
        assert wait_for(lambda: real.engine.num_running == 8, timeout_s=60)
        long_prompt = {"model": MODEL, "prompt": [[200 + i for i in range(900)]], "max_tokens": 1, "stream": True}
        for _ in range(2):  # 1,800 prompt tokens waiting
            streams.enter_context(http.stream("POST", "/v1/completions", json=long_prompt))
        start = time.monotonic()
        r = http.post("/v1/completions", json=long_prompt)  # 2,700 > max_waiting_tokens = 2,400
        assert r.status_code == 429 and r.headers["content-type"] == "application/json"
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        for _ in range(6):  # by requests: 8 waiting at most
            streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 429 and "requests" in r.json()["error"]["message"]
        assert time.monotonic() - start < 10  # answered at admission, never queued
    assert wait_for(real.idle, timeout_s=10)


# ---- 8. faults -------------------------------------------------------------------------------------------

class Poison:
    """Makes a step raise whenever it holds a request whose prompt contains ``POISON``: inside the
    runner (``where="execute"``) or at the end of planning, after the scheduler changed its state
    (``where="schedule"``, the plan is lost). Counts the failures."""

    def __init__(self, engine: AsyncEngine, where: str) -> None:
        self.core = engine.core
        self.where = where
        self.poisoned: set[str] = set()
        self.failures = 0
        self._originals = (self.core.runner.execute, self.core.scheduler.schedule)

    def _check(self, plan) -> None:
        for seq in plan.seqs:
            if seq.new_request is not None and POISON in seq.new_request.prompt_token_ids:
                self.poisoned.add(seq.request_id)
        if any(seq.request_id in self.poisoned for seq in plan.seqs):
            self.failures += 1
            raise RuntimeError(f"injected fault ({self.where})")

    def __enter__(self) -> Poison:
        execute, schedule = self._originals
        if self.where == "execute":
            self.core.runner.execute = lambda plan: (self._check(plan), execute(plan))[1]
        else:
            self.core.scheduler.schedule = lambda: (lambda plan: (self._check(plan), plan)[1])(schedule())
        return self

    def __exit__(self, *exc: object) -> None:
        self.core.runner.execute, self.core.scheduler.schedule = self._originals


@pytest.mark.parametrize("where", ["execute", "schedule"])
def test_8_a_failing_request_fails_alone_and_the_engine_serves_on(real: Real, where: str) -> None:
    questions = ["Name a planet.", "What is 3 times 3?", "Say yes."]
    with real.http() as http:
        if "innocent" not in real.cache:
            real.cache["innocent"] = [stream_text(stream_chunks(http, "/v1/chat/completions",
                                                                chat_body(q, max_tokens=10))) for q in questions]
        results: dict[str, list[dict]] = {}

        def run(name: str, path: str, body: dict) -> None:
            results[name] = stream_chunks(http, path, body)

        jobs = [("poison", "/v1/completions", {"model": MODEL, "prompt": [[POISON, 504, 3117]], "max_tokens": 10})]
        jobs += [(f"q{i}", "/v1/chat/completions", chat_body(q, max_tokens=10)) for i, q in enumerate(questions)]
        with Poison(real.engine, where) as poison:
            threads = [threading.Thread(target=run, args=job) for job in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        assert results["poison"][-1]["error"]["code"] == "engine_error"  # error event, then [DONE]
        assert poison.failures == 2  # retried once (alone), then failed: not retried again
        assert [stream_text(results[f"q{i}"]) for i in range(3)] == real.cache["innocent"]
        assert http.get("/health").status_code == 200
        assert stream_text(stream_chunks(http, "/v1/chat/completions", chat_body(questions[0], max_tokens=10))) == \
            real.cache["innocent"][0]
    assert wait_for(real.idle, timeout_s=10)
    assert real.engine.core.scheduler.isolated_request_ids == ()


def test_8_an_engine_that_cannot_step_dies_and_says_so(smollm2) -> None:
    engine = _engine(smollm2, spec=False)
    engine.core.faults.max_consecutive_failures = 3

    def broken(plan):
        raise RuntimeError("the runner is broken")

    engine.core.runner.execute = broken
    with run_server(engine, served_model_name=MODEL) as server, server.http() as http:
        replies: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: replies.append(http.post(
            "/v1/chat/completions", json=chat_body("hi", max_tokens=4)))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(r.json()["error"]["code"] for r in replies) == ["engine_dead", "engine_error"]
        assert wait_for(lambda: http.get("/health").status_code == 503)  # the CLI then exits with 1


# ---- 9. fairness ------------------------------------------------------------------------------------------

def test_9_short_chat_is_not_held_behind_a_long_prefill(real: Real) -> None:
    """A 768-token prompt takes six steps of 128 tokens to prefill; a short chat sent once it runs
    gets its reply before the long prompt's first token (its prompt is below the 64-token
    long-prefill threshold: it is admitted whole next to the long prompt's capped chunk)."""
    done: dict[str, float] = {}
    long_body = {"model": MODEL, "prompt": [[300 + i for i in range(768)]], "max_tokens": 1}
    with real.http() as http:

        def long_request() -> None:
            http.post("/v1/completions", json=long_body)
            done["long"] = time.monotonic()

        thread = threading.Thread(target=long_request)
        thread.start()
        assert wait_for(lambda: real.engine.num_running == 1, timeout_s=30)
        r = http.post("/v1/chat/completions", json=chat_body("Hi!", max_tokens=1))
        done["short"] = time.monotonic()
        thread.join(timeout=300)
    assert r.status_code == 200 and done["short"] < done["long"]
