"""``POST /v1/responses`` against the fake engine: string and item inputs, instructions, limits, function
tools, typed stream events (the openai SDK's ``responses.create`` parses them), stateless refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sparkserve.testing.fake_engine import DEFAULT_REPLY, FakeEngine, FakeTokenizer
from sparkserve.testing.server_harness import RunningServer, run_server

MODEL = "fake-model"
TOK = FakeTokenizer()
CALL = '[[<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>]]'
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with run_server(FakeEngine(max_model_len=2048)) as running:  # room for the Hermes tool prompt
        yield running


def _events(srv: RunningServer, **body: object) -> list[tuple[str, dict]]:
    with srv.http() as http:
        r = http.post("/v1/responses", json={"model": MODEL, "stream": True, **body})
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event", ""), json.loads(lines["data"])))
    assert [e for e, _ in out] == [d["type"] for _, d in out]  # typed events
    assert [d["sequence_number"] for _, d in out] == list(range(len(out)))
    return out


def test_string_input_with_instructions(srv: RunningServer) -> None:
    resp = srv.openai().responses.create(model=MODEL, input="hi", instructions="Be brief.", service_tier="auto")
    assert resp.status == "completed" and resp.output_text == DEFAULT_REPLY
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    prompt = TOK.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert list(srv.engine.prompts.values())[-1] == prompt
    assert resp.usage.input_tokens == len(prompt) and resp.usage.output_tokens == len(TOK.encode(DEFAULT_REPLY)) + 1
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_max_output_tokens_makes_it_incomplete(srv: RunningServer) -> None:
    resp = srv.openai().responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0.0)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == TOK.decode(TOK.encode(DEFAULT_REPLY)[:2])
    assert list(srv.engine.params.values())[-1].max_tokens == 2


def test_stream_events(srv: RunningServer) -> None:
    events = _events(srv, input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    types = [t for t, _ in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(d["delta"] for t, d in events if t == "response.output_text.delta")
    final = events[-1][1]["response"]
    assert text == DEFAULT_REPLY == final["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] > 0 and events[0][1]["response"]["status"] == "in_progress"


def test_sdk_stream(srv: RunningServer) -> None:
    stream = srv.openai().responses.create(model=MODEL, input="hi", stream=True)
    events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == DEFAULT_REPLY
    assert events[-1].response.output_text == DEFAULT_REPLY


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_output(srv: RunningServer, stream: bool) -> None:
    kw = dict(input=CALL, tools=[WEATHER], tool_choice="auto")
    if not stream:
        resp = srv.openai().responses.create(model=MODEL, **kw)
        calls = [o for o in resp.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
        assert calls[0].call_id.startswith("call_") and resp.status == "completed"
        return
    events = _events(srv, **kw)
    args = "".join(d["delta"] for t, d in events if t == "response.function_call_arguments.delta")
    done = next(d for t, d in events if t == "response.function_call_arguments.done")
    assert json.loads(args) == {"city": "Paris"} and done["arguments"] == args and done["name"] == "get_weather"
    final = events[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["function_call"]


def test_tool_round_trip_input_items(srv: RunningServer) -> None:
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
              "id": "fc_1", "status": "completed"},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees [[It is 18 degrees.]]"}]
    resp = srv.openai().responses.create(model=MODEL, input=items, tools=[WEATHER])
    assert resp.output_text == "It is 18 degrees."
    prompt = TOK.decode(list(srv.engine.prompts.values())[-1], skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 degrees" in prompt


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi", "store": True}, "store"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "frobnicate": 1}, "frobnicate"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x" * 20_000}, "input"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests(srv: RunningServer, body: dict, param: str, stream: bool) -> None:
    with srv.http() as http:
        r = http.post("/v1/responses", json={"model": MODEL, "stream": stream, **body})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    assert (r.json()["error"]["param"] or "").split(".")[0] == param, r.json()


def test_strict_mode_refuses_ignored_responses_fields() -> None:
    with run_server(strict_openai_fields=True) as strict, strict.http() as http:
        refused = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "reasoning": {"effort": "low"}})
        fine = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "store": False})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning"
    assert fine.status_code == 200 and fine.json()["store"] is False
