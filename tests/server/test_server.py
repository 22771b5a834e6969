"""The OpenAI-compatible server on a real uvicorn, queried by the official ``openai`` client and
httpx, against the deterministic :class:`sparkserve.testing.fake_engine.FakeEngine` (no model, fast)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from sparkserve.scheduler.errors import RequestRejectedError
from sparkserve.server.app import build_app
from sparkserve.server.errors import engine_error_to_api_error
from sparkserve.server.metrics import ServerMetrics
from sparkserve.testing.fake_engine import (
    DEFAULT_REPLY,
    EOS,
    IM_END,
    EngineDeadError,
    FakeEngine,
    FakeTokenizer,
    QueueFullError,
)
from sparkserve.testing.server_harness import (
    RunningServer,
    http_status,
    launch_fake_engine,
    run_server,
    wait_for,
)

MODEL = "fake-model"
TOK = FakeTokenizer()


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with run_server() as running:
        yield running


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def prompt_len(content: str) -> int:
    return len(TOK.encode(TOK.apply_chat_template(chat(content))))


def sse_data(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    events = [e for e in body.split("\n\n") if e.strip()]
    assert all(e.startswith(("data: ", ":")) for e in events), events
    return [e.removeprefix("data: ") for e in events if e.startswith("data: ")]


# ---- happy paths -----------------------------------------------------------------------------


def test_models_health_ready(srv: RunningServer) -> None:
    assert [m.id for m in srv.openai().models.list().data] == [MODEL]
    with srv.http() as http:
        assert http.get("/health").status_code == 200
        before = srv.engine.ready_checks
        assert [http.get("/ready").status_code for _ in range(3)] == [200, 200, 200]
        assert srv.engine.ready_checks - before <= 1  # cached: probes cannot flood the engine


def test_chat_non_streaming(srv: RunningServer) -> None:
    resp = srv.openai().chat.completions.create(model=MODEL, messages=chat("hi"))
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == DEFAULT_REPLY
    assert choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == prompt_len("hi")
    assert resp.usage.completion_tokens == len(TOK.encode(DEFAULT_REPLY)) + 1  # + EOS
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_streaming_with_usage_and_utf8(srv: RunningServer) -> None:
    stream = srv.openai().chat.completions.create(
        model=MODEL, messages=chat("hi {spec=2}"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in d for d in deltas)  # multi-byte characters never split
    assert "".join(deltas) == DEFAULT_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(TOK.encode(DEFAULT_REPLY)) + 1
    )


def test_continuous_usage_stats(srv: RunningServer) -> None:
    """stream_options.continuous_usage_stats (vLLM's extension): every chunk carries the usage so far,
    cumulative, ending at the final usage; without it only the last chunk does."""
    with srv.http() as http:
        for path, body in (
            ("/v1/chat/completions", {"messages": chat("hi {spec=2}")}),
            ("/v1/completions", {"prompt": "hi {spec=2}"}),
        ):
            options = {"include_usage": True, "continuous_usage_stats": True}
            r = http.post(path, json={"model": MODEL, "stream": True, "stream_options": options, **body})
            chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
            counts = [c["usage"]["completion_tokens"] for c in chunks]
            assert counts == sorted(counts) and counts[-1] == len(TOK.encode(DEFAULT_REPLY)) + 1
            assert len(set(counts)) > 2  # the count grows during the stream
            r = http.post(path, json={"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body})
            chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
            assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == counts[-1]


def test_sse_framing_and_done(srv: RunningServer) -> None:
    with srv.http() as http:
        for path, body in (
            ("/v1/chat/completions", {"messages": chat("hi")}),
            ("/v1/completions", {"prompt": "hi"}),
        ):
            r = http.post(path, json={"model": MODEL, "stream": True, **body})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            data = sse_data(r.text)
            assert data[-1] == "[DONE]" and all(json.loads(d)["id"] for d in data[:-1])


def test_completions(srv: RunningServer) -> None:
    client = srv.openai()
    resp = client.completions.create(model=MODEL, prompt="say [[abc]]", max_tokens=10)
    assert resp.choices[0].text == "abc" and resp.object == "text_completion"
    assert resp.usage.prompt_tokens == len(TOK.encode("say [[abc]]"))
    ids = client.completions.create(model=MODEL, prompt=TOK.encode("[[xyz]]"), max_tokens=10)
    assert ids.choices[0].text == "xyz"
    multi = client.completions.create(model=MODEL, prompt=["[[a]]", "[[b]]"], n=2, max_tokens=5)
    assert [(c.index, c.text) for c in sorted(multi.choices, key=lambda c: c.index)] == [
        (0, "a"),
        (1, "a"),
        (2, "b"),
        (3, "b"),
    ]
    text = "".join(
        c.choices[0].text for c in client.completions.create(model=MODEL, prompt="[[é☕]]", stream=True)
    )
    assert text == "é☕"


def test_n_streaming_and_content_parts(srv: RunningServer) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "[[ok]]"}],
        },
    ]
    chunks = list(srv.openai().chat.completions.create(model=MODEL, messages=messages, n=3, stream=True))
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {0: "ok", 1: "ok", 2: "ok"}


def test_sampling_params_mapping(srv: RunningServer) -> None:
    resp = srv.openai().chat.completions.create(
        model=MODEL,
        messages=chat("[[abc]]"),
        temperature=0.5,
        top_p=0.9,
        seed=7,
        n=2,
        stop="zz",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"65": 10},
        max_completion_tokens=20,
        extra_body={"top_k": 5, "min_p": 0.1, "stop_token_ids": [66], "target_tpot_ms": 50.0},
    )
    p0, p1 = (srv.engine.params[f"{resp.id}-{i}"] for i in range(2))
    assert (p0.seed, p1.seed) == (7, 8) and p0.n == 1
    assert (p0.temperature, p0.top_p, p0.top_k, p0.min_p, p0.max_tokens) == (0.5, 0.9, 5, 0.1, 20)
    assert (p0.presence_penalty, p0.frequency_penalty, p0.target_tpot_ms) == (0.5, -0.5, 50.0)
    assert p0.stop == ("zz",) and p0.logit_bias == ((65, 10.0),)
    assert set(p0.stop_token_ids) == {66, IM_END} and EOS not in p0.stop_token_ids
    default = srv.openai().chat.completions.create(
        model=MODEL, messages=chat("x"), extra_body={"ignore_eos": True}
    )
    p = srv.engine.params[f"{default.id}-0"]
    assert p.max_tokens == min(1024, 256 - prompt_len("x")) and p.stop_token_ids == () and p.ignore_eos
    assert default.choices[0].finish_reason == "length"


def test_max_tokens_and_logprobs(srv: RunningServer) -> None:
    client = srv.openai()
    resp = client.chat.completions.create(
        model=MODEL, messages=chat("hi"), max_tokens=3, logprobs=True, top_logprobs=2
    )
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob == -0.5 for t in content)
    comp = client.completions.create(model=MODEL, prompt="[[abc]]", logprobs=1, max_tokens=2)
    assert comp.choices[0].logprobs.tokens == ["a", "b"] and comp.choices[0].logprobs.text_offset == [0, 1]


@pytest.mark.parametrize("spec", [1, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(srv: RunningServer, spec: int, stream: bool) -> None:
    """Tokens are "Hello", ", wor", "ld!": the stop string "world" spans the last two; the
    completion counts the token that completed it (3 tokens) and nothing after it."""
    kwargs = {
        "model": MODEL,
        "messages": chat(f"[[Hello, world! more]] {{spec={spec}}}"),
        "stop": ["world", "zzz"],
    }
    if stream:
        chunks = list(
            srv.openai().chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert not any("w" in d for d in deltas)  # the stop string's start was held back
        text, usage = "".join(deltas), chunks[-1].usage
        finish = [c.choices[0] for c in chunks if c.choices][-1]
    else:
        resp = srv.openai().chat.completions.create(**kwargs)
        text, usage, finish = resp.choices[0].message.content, resp.usage, resp.choices[0]
    assert text == "Hello, " and finish.finish_reason == "stop" and usage.completion_tokens == 3
    assert finish.model_extra["stop_reason"] == "world"
    assert wait_for(lambda: srv.engine.num_running == 0)


def test_held_back_prefix_is_released(srv: RunningServer) -> None:
    resp = srv.openai().completions.create(model=MODEL, prompt="[[ab abd abc]]", stop=["abc!"], stream=True)
    assert "".join(c.choices[0].text for c in resp) == "ab abd abc"


# ---- errors ----------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": chat("x"), "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": chat("x"), "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("x"), "max_completion_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("x" * 300)}, 400, "messages"),
    ("/v1/chat/completions", {"messages": chat("x"), "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": chat("x"), "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": chat("x"), "n": 100}, 400, "n"),
    ("/v1/chat/completions", {"messages": chat("x"), "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": chat("x"), "tool_choice": "auto"}, 400, "tool_choice"),
    (
        "/v1/chat/completions",
        {"messages": chat("x"), "response_format": {"type": "xml"}},
        400,
        "response_format",
    ),
    ("/v1/chat/completions", {"messages": chat("x"), "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": chat("x"), "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
    ("/v1/chat/completions", {"messages": chat("x"), "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": chat("x"), "logit_bias": {"1": 200}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": chat("x"), "logit_bias": {"9999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": chat("x"), "stop_token_ids": [9999]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": chat("x"), "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": chat("x"), "frobnicate": 1}, 400, "frobnicate"),
    (
        "/v1/chat/completions",
        {"messages": chat("x"), "stream": False, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": chat("RAISE")}, 400, "messages"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 256}, 400, "max_tokens"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests(
    srv: RunningServer, path: str, body: dict, status: int, param: str, stream: bool
) -> None:
    with srv.http() as http:
        r = http.post(path, json={"model": MODEL, "stream": stream, **body})
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"] or "").split(".")[0] == param, error


def test_engine_errors_map_to_statuses() -> None:
    rejected = engine_error_to_api_error(
        RequestRejectedError("too long", "prompt", "context_length_exceeded")
    )
    assert (rejected.status, rejected.param, rejected.code) == (400, "prompt", "context_length_exceeded")
    full = engine_error_to_api_error(QueueFullError("full", retry_after_s=0.2))
    assert (full.status, full.headers) == (429, {"Retry-After": "1"})
    assert engine_error_to_api_error(EngineDeadError("x")).status == 503
    assert engine_error_to_api_error(KeyError("x")) is None


def test_malformed_json(srv: RunningServer) -> None:
    with srv.http() as http:
        for body in (b"{not json", b"[1, 2]", b""):
            r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_queue_full_gives_429_with_retry_after(srv: RunningServer) -> None:
    body = {"model": MODEL, "messages": chat("{delay=0.05} [[" + "x" * 100 + "]]"), "stream": True}
    with srv.http() as http, ExitStack() as streams:
        capacity = srv.engine.max_num_seqs + srv.engine.max_waiting_requests
        for _ in range(capacity):
            r = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
            assert r.status_code == 200
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "2" and r.json()["error"]["code"]
    assert wait_for(lambda: srv.engine.num_running == 0 and srv.engine.num_waiting == 0)


def test_disconnect_mid_stream_aborts(srv: RunningServer) -> None:
    body = {"model": MODEL, "messages": chat("{delay=0.05} [[" + "y" * 100 + "]]"), "stream": True}
    with srv.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: ")).removeprefix("data: "))
        next(lines)
        assert srv.engine.num_running == 1
    assert wait_for(lambda: srv.engine.num_running == 0 and f"{first['id']}-0" in srv.engine.aborted)


def test_disconnect_non_streaming_aborts(srv: RunningServer) -> None:
    before = len(srv.engine.aborted)
    body = {"model": MODEL, "prompt": "{delay=0.05} [[" + "z" * 100 + "]]"}
    with srv.http(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    assert wait_for(lambda: srv.engine.num_running == 0 and len(srv.engine.aborted) == before + 1)


def test_api_key() -> None:
    with run_server(api_key="sekret") as running, running.http() as http:
        assert running.openai().models.list().data[0].id == MODEL
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.post("/v1/chat/completions", headers=headers, content=b"{bad")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200


def test_engine_death_mid_stream() -> None:
    with run_server() as running, running.http() as http:
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": chat("{die=3}"), "stream": True}
        )
        data = sse_data(r.text)
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "engine_dead"
        assert http.get("/health").status_code == 503 and http.get("/ready").status_code == 503
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
        with pytest.raises(openai.APIError):
            list(running.openai().chat.completions.create(model=MODEL, messages=chat("x"), stream=True))
    with run_server() as running, running.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "{die=2}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_metrics_hook() -> None:
    class Metrics:
        def render(self) -> tuple[bytes, str]:
            return b"sparkserve:up 1\n", "text/plain; version=0.0.4"

    with TestClient(build_app(FakeEngine(), metrics=Metrics())) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.text == "sparkserve:up 1\n"
    with TestClient(build_app(FakeEngine())) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/nowhere").json()["error"]["type"] == "not_found_error"
        assert client.get("/openapi.json").status_code == 200


def test_sigterm_drains_then_exits() -> None:
    """SIGTERM during a stream: the stream completes, new requests get 503, the process exits 0."""
    with launch_fake_engine("--drain-timeout", "10", timeout_s=30) as server:
        url = server.url
        reply = "w" * 40
        result: dict[str, str] = {}

        def stream() -> None:
            body = {"model": MODEL, "prompt": "{delay=0.05} [[" + reply + "]]", "stream": True}
            result["body"] = httpx.post(url + "/v1/completions", json=body, timeout=30).text

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: http_status(url + "/ready") == 503)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        thread.join(timeout=20)
        data = sse_data(result["body"])
        assert (
            data[-1] == "[DONE]" and "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == reply
        )
        assert server.proc.wait(timeout=15) == 0


# ---- request metrics (ServerMetrics fed by the serving layer) ----------------------------------------


def _metric(m: ServerMetrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, {"model_name": m.model_name, **labels})
    assert got is not None, f"series {name}{labels} missing"
    return got


def test_request_metrics_equal_usage() -> None:
    m = ServerMetrics(MODEL)
    with run_server(metrics=m) as running:
        client = running.openai()
        usages = []
        stream = client.chat.completions.create(
            model=MODEL,
            messages=chat("{spec=3} [[Hello, world!]]"),
            stream=True,
            stream_options={"include_usage": True},
        )
        usages.append([c.usage for c in stream if c.usage][0])
        # Two prompts x n=2: usage counts each prompt once, completion tokens over all four choices.
        r = client.completions.create(model=MODEL, prompt=["[[abc]]", "[[de fg]] x"], n=2, stop=[" f"])
        usages.append(r.usage)
        r = client.completions.create(model=MODEL, prompt="{spec=2} [[one two three]]", max_tokens=5)
        assert r.choices[0].finish_reason == "length"
        usages.append(r.usage)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert _metric(m, "sparkserve:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert _metric(m, "sparkserve:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert _metric(m, "sparkserve:request_success_total", finished_reason="stop") == 5
    assert _metric(m, "sparkserve:request_success_total", finished_reason="length") == 1
    assert _metric(m, "sparkserve:request_rejected_total", reason="invalid_request") == 1
    assert _metric(m, "sparkserve:request_generation_tokens_sum") == sum(u.completion_tokens for u in usages)
    assert _metric(m, "sparkserve:e2e_request_latency_seconds_count") == 6
    assert _metric(m, "sparkserve:request_queue_time_seconds_count") == 6  # first_scheduled_time known
    # The chat reply ("Hello, world!" + EOS = 4 tokens) in updates of 3 tokens: 2 events, 1 gap.
    assert _metric(m, "sparkserve:request_time_per_output_token_seconds_count") == 6


def test_request_metrics_rejections_and_aborts() -> None:
    m = ServerMetrics(MODEL)
    engine = FakeEngine(max_num_seqs=1, max_waiting_requests=0)
    with run_server(engine, metrics=m, api_key="k") as running, running.http() as http:
        auth = {"Authorization": "Bearer k"}
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        assert http.post("/v1/completions", json={"model": MODEL}, headers=auth).status_code == 400
        # slow stream (0.2 s a token for 50 tokens): the engine stays busy however loaded the machine is
        body = {"model": MODEL, "prompt": "{delay=0.2} [[" + "z" * 50 + "]]", "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers=auth) as response:
            lines = response.iter_lines()  # keep it: dropping the iterator closes the response
            next(lines)
            busy = http.post("/v1/completions", json={"model": MODEL, "prompt": "y"}, headers=auth)
            assert busy.status_code == 429
        assert wait_for(lambda: _metric(m, "sparkserve:request_success_total", finished_reason="abort") == 1)
    assert _metric(m, "sparkserve:request_rejected_total", reason="unauthorized") == 1
    assert _metric(m, "sparkserve:request_rejected_total", reason="invalid_request") == 1
    assert _metric(m, "sparkserve:request_rejected_total", reason="queue_full") == 1
    assert _metric(m, "sparkserve:time_to_first_token_seconds_count") == 1


def test_request_metrics_engine_error_and_draining() -> None:
    m = ServerMetrics(MODEL)
    app = build_app(FakeEngine(), metrics=m)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "{die=2}"})
        assert r.status_code == 503
        assert _metric(m, "sparkserve:request_success_total", finished_reason="error") == 1
    app = build_app(FakeEngine(), metrics=m)
    with TestClient(app) as client:
        app.state.server.draining = True
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
    assert _metric(m, "sparkserve:request_rejected_total", reason="draining") == 1
    assert _metric(m, "sparkserve:request_rejected_total", reason="queue_full") == 0


def test_cli_subcommands() -> None:
    from sparkserve.cli import build_parser, engine_args_from
    from sparkserve.engine.config import EngineArgs

    parser = build_parser()
    ns = parser.parse_args(["profile", "--out", "p.json", "--drafter", "none", "--max-num-seqs", "4"])
    assert ns.command == "profile" and ns.out == "p.json"
    args = engine_args_from(ns)
    assert args.drafter == "none" and args.max_num_seqs == 4 and args.profile_path is None
    serve = parser.parse_args(["serve", "--profile", "p.json", "--metrics-profile-every", "10"])
    assert engine_args_from(serve).profile_path == "p.json" and serve.metrics_profile_every == 10
    assert engine_args_from(serve).cuda_graphs == "auto"
    assert engine_args_from(parser.parse_args(["serve", "--cuda-graphs", "off"])).cuda_graphs == "off"
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineArgs(cuda_graphs="eager")
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"serve", "profile", "gen-data", "train-drafter", "calibrate-drafter", "eval-drafter"} <= set(
        commands
    )
    assert set(build_parser(include_train=False)._subparsers._group_actions[0].choices) == {
        "serve",
        "profile",
        "bench",
        "replicas",
    }  # type: ignore[union-attr]
    # one flag says how to speculate; the old spellings stay accepted as aliases
    def spec(*flags: str) -> tuple[str | None, str, str]:
        args = engine_args_from(parser.parse_args(["serve", *flags]))
        return args.drafter, args.speculative_method, args.drafter_kind

    assert spec() == (None, "dspark", "dspark")
    assert spec("--speculative-method", "none") == spec("--drafter", "none") == ("none", "dspark", "dspark")
    assert spec("--speculative-method", "dflash", "--drafter", "d") == spec("--drafter-kind", "dflash", "--drafter", "d")
    assert spec("--speculative-method", "draft-model") == (None, "dspark", "draft-model")
    assert spec("--speculative-method", "hybrid", "--drafter-kind", "dflash") == (None, "hybrid", "dflash")
    assert spec("--speculative-method", "suffix") == (None, "suffix", "dspark")
    with pytest.raises(ValueError, match="contradicts"):
        spec("--speculative-method", "dflash", "--drafter-kind", "draft-model")
    bench = parser.parse_args(["bench", "--target", "a=http://h:1", "--launch", "b=--drafter none",
                               "--max-concurrency", "1", "4", "--goodput", "ttft:500", "tpot:50"])
    assert bench.command == "bench" and bench.max_concurrency == [1, 4] and bench.launch == ["b=--drafter none"]
