"""What current OpenAI SDKs and agent frameworks send, against the fake engine: OpenAI fields that mean
nothing here (accepted with a warning, or 400 in strict mode), tools without parameters, ``/tokenize``
and ``/detokenize``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from sparkserve.server.protocol import IGNORED_OPENAI_FIELDS, ChatCompletionRequest
from sparkserve.server.structured import NO_ARGUMENTS_SCHEMA, grammar_spec, tool_parameters
from sparkserve.server.tool_parsers import HermesStreamParser, parse_tool_calls
from sparkserve.testing.fake_engine import DEFAULT_REPLY, FakeEngine, FakeTokenizer
from sparkserve.testing.server_harness import RunningServer, run_server

MODEL = "fake-model"
TOK = FakeTokenizer()
SDK_FIELDS = {
    "service_tier": "auto", "store": False, "metadata": {"run": "7"}, "prompt_cache_key": "k",
    "safety_identifier": "u-1", "reasoning_effort": "low", "verbosity": "medium", "modalities": ["text"],
    "prompt_cache_retention": "24h", "prediction": {"type": "content", "content": "x"},
}


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with run_server(FakeEngine(max_model_len=2048)) as running:  # room for the Hermes tool prompt
        yield running


def _chat(**kw: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_sdk_fields_are_ignored_with_a_warning(srv: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    assert set(SDK_FIELDS) <= set(IGNORED_OPENAI_FIELDS)
    with srv.http() as http, caplog.at_level(logging.WARNING, logger="sparkserve.server.serving"):
        plain = http.post("/v1/chat/completions", json=_chat()).json()
        sent = http.post("/v1/chat/completions", json=_chat(**SDK_FIELDS))
        completion = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "service_tier": "flex"})
    assert sent.status_code == 200, sent.text
    assert sent.json()["choices"] == plain["choices"]  # nothing changed in the output
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == DEFAULT_REPLY
    warned = [r.getMessage() for r in caplog.records if "ignoring request fields" in r.getMessage()]
    assert any("service_tier" in m and "verbosity" in m for m in warned), warned


def test_sdk_fields_via_the_openai_client(srv: RunningServer) -> None:
    reply = srv.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], service_tier="auto", store=False,
        metadata={"a": "b"}, prompt_cache_key="k", safety_identifier="s", reasoning_effort="low", verbosity="low")
    assert reply.choices[0].message.content == DEFAULT_REPLY


@pytest.mark.parametrize(("body", "param"), [
    (_chat(frobnicate=1), "frobnicate"),  # a misspelt field is still a 400
    (_chat(modalities=["text", "audio"]), "modalities"),  # would change the output: refused
])
def test_unknown_or_output_changing_fields_stay_400(srv: RunningServer, body: dict, param: str) -> None:
    with srv.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == param, r.text


def test_strict_mode_refuses_ignored_fields() -> None:
    with run_server(strict_openai_fields=True) as strict, strict.http() as http:
        refused = http.post("/v1/chat/completions", json=_chat(service_tier="auto", stream=True))
        fine = http.post("/v1/chat/completions", json=_chat(user="someone"))
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["param"] == "service_tier"
    assert fine.status_code == 200


# ---- tools without parameters -------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [None, {}, {"type": "object"}, {"type": "object", "properties": {}}])
def test_tool_without_parameters_is_constrained_to_empty_arguments(parameters: dict | None) -> None:
    assert tool_parameters(parameters) == NO_ARGUMENTS_SCHEMA
    function = {"name": "ping"} if parameters is None else {"name": "ping", "parameters": parameters}
    req = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                tools=[{"type": "function", "function": function}], tool_choice="required")
    spec = grammar_spec(req)
    assert spec is not None and json.loads(spec.source)["tools"][0]["parameters"] == NO_ARGUMENTS_SCHEMA


def test_tool_with_parameters_or_a_map_keeps_its_schema() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    mapping = {"type": "object", "additionalProperties": {"type": "string"}}
    assert tool_parameters(schema) is schema and tool_parameters(mapping) is mapping


@pytest.mark.parametrize("body", ['{"name": "ping"}', '{"name": "ping", "arguments": {}}'])
def test_parameterless_call_parses_whole_and_streamed(body: str) -> None:
    text = f"<tool_call>{body}</tool_call>"
    content, calls = parse_tool_calls(text)
    assert content is None and [(c.function.name, c.function.arguments) for c in calls] == [("ping", "{}")]
    parser = HermesStreamParser()
    deltas = [d for i in range(len(text)) for d in parser.feed(text[i]).tool_calls] + parser.finish().tool_calls
    assert deltas[0].function.name == "ping"
    assert "".join(d.function.arguments or "" for d in deltas) == "{}"
    assert parse_tool_calls('<tool_call>{"name": "ping", "x": 1}</tool_call>')[1] == []  # not a call


@pytest.mark.parametrize("stream", [False, True])
def test_parameterless_tool_call_over_the_api(srv: RunningServer, stream: bool) -> None:
    tools = [{"type": "function", "function": {"name": "ping", "description": "no arguments"}}]
    kw = dict(model=MODEL, messages=[{"role": "user", "content": '[[<tool_call>{"name": "ping"}</tool_call>]]'}],
              tools=tools)
    client = srv.openai()
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [("ping", "{}")]
        return
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "ping" and "".join(d.function.arguments or "" for d in deltas) == "{}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


# ---- /tokenize and /detokenize ------------------------------------------------------------------


def test_tokenize_prompt_and_detokenize_round_trip(srv: RunningServer) -> None:
    with srv.http() as http:
        r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello<|im_end|>é", "return_token_strs": True})
        body = r.json()
        back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]}).json()
        no_model = http.post("/tokenize", json={"prompt": "Hello"}).json()
    assert r.status_code == 200, r.text
    assert body["tokens"] == TOK.encode("Hello<|im_end|>é") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == srv.engine.max_model_len == 2048
    assert body["token_strs"] == [TOK.decode([t], skip_special_tokens=False) for t in body["tokens"]]
    assert back == {"prompt": "Hello<|im_end|>é"}
    assert no_model["tokens"] == TOK.encode("Hello") and no_model["token_strs"] is None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tokenize_chat_uses_the_template(srv: RunningServer, add_generation_prompt: bool) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<|im_end|>hi"}]
    with srv.http() as http:
        body = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": add_generation_prompt}).json()
        served = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).json()
    assert body["tokens"] == TOK.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    if add_generation_prompt:
        assert body["count"] == served["usage"]["prompt_tokens"]  # what a chat request is charged


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/tokenize", {"messages": [], "prompt": "x"}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x" * 20_000}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, 99_999]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
])
def test_tokenize_bad_requests(srv: RunningServer, path: str, body: dict, status: int, param: str) -> None:
    with srv.http() as http:
        r = http.post(path, json=body)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    assert (r.json()["error"]["param"] or "").split(".")[0] == param, r.json()


def test_tokenizer_info(srv: RunningServer) -> None:
    with srv.http() as http:
        info = http.get("/tokenizer_info").json()
        eos_ids = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert info["eos_token"] == "<|endoftext|>" and eos_ids == [TOK.eos_token_id]  # how lm-eval finds EOS
    assert info["vocab_size"] == TOK.vocab_size and info["max_model_len"] == 2048
