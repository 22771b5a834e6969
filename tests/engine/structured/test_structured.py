"""Structured outputs and tool calls: grammar masks on the real SmolLM2-135M with speculation on and off,
the grammar state over rejected drafts, the OpenAI API (openai client), the Hermes tool-call parser."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from sparkserve.engine.async_engine import AsyncEngine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.spec_decode.drafter import DraftOutput, TokenDrafter
from sparkserve.engine.structured.grammar import GrammarError, GrammarSpec
from sparkserve.engine.structured.logits_mask import GrammarLogitsMask
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.server.protocol import ChatCompletionRequest
from sparkserve.server.structured import chat_messages, grammar_spec
from sparkserve.server.tool_parsers import HermesStreamParser, parse_tool_calls
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.server_harness import run_server
from sparkserve.testing.spec_records import generate_recorded

PROFILE = Path(__file__).resolve().parents[2] / "data" / "profile_small.json"

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                                                "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
                                               "required": ["name"], "additionalProperties": False}},
     "required": ["city"], "additionalProperties": False},
    {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
     "required": ["fruits"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
]
QUESTIONS = ["Describe a person as JSON.", "Describe a city as JSON.", "List fruits as JSON.", "Pick a color as JSON."]
MAX_TOKENS = 48


def _args(**kw) -> EngineArgs:
    return EngineArgs(dtype="float32", num_kv_blocks=256, block_size=16, max_num_batched_tokens=256, max_num_seqs=8, **kw)


def _prompt(tok, question: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": question}])


def _params(tok, grammar: str) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=tok.stop_token_ids, grammar=grammar)


@pytest.fixture(scope="module")
def grammars(smollm2) -> list[str]:
    return [smollm2.tokenizer.grammar_compiler.compile(GrammarSpec("json_schema", json.dumps(s))) for s in SCHEMAS]


@pytest.fixture(scope="module")
def baseline(smollm2, grammars) -> list[list[int]]:
    tok = smollm2.tokenizer
    core = EngineCore(_args(drafter="none"), loaded=smollm2)
    return [core.generate_batch([_prompt(tok, q)], _params(tok, g))[0] for q, g in zip(QUESTIONS, grammars, strict=True)]


def _check_json(tok, tokens: list[int], schema: dict) -> None:
    assert tokens[-1] in tok.stop_token_ids and len(tokens) < MAX_TOKENS, "must end by EOS (finish_reason stop)"
    jsonschema.validate(json.loads(tok.decode(tokens)), schema)


def test_json_schema_outputs_validate_without_speculation(smollm2, baseline) -> None:
    for tokens, schema in zip(baseline, SCHEMAS, strict=True):
        _check_json(smollm2.tokenizer, tokens, schema)


@pytest.mark.parametrize("method", ["dspark", "suffix"])
def test_json_schema_with_speculation_equals_greedy(smollm2, grammars, baseline, method) -> None:
    tok = smollm2.tokenizer
    core = EngineCore(_args(speculative_method=method, verify_policy="fixed:4"), loaded=smollm2,
                      profile=ThroughputProfile.load(PROFILE))
    outs, stats = generate_recorded(core, [_prompt(tok, q) for q in QUESTIONS], [_params(tok, g) for g in grammars])
    for i, (out, schema) in enumerate(zip(outs, SCHEMAS, strict=True)):
        _check_json(tok, out, schema)
        prompt = _prompt(tok, QUESTIONS[i])
        assert_same_or_near_tie(out, baseline[i], top2_gap_fn(smollm2.model, prompt, baseline[i]), label=f"{method}[{i}]")
    assert stats.num_draft_tokens > 0


# ---------------------------------------------------------------- grammar state and drafts
def _mask_for(tok, grammar: str) -> GrammarLogitsMask:
    mask = GrammarLogitsMask(lambda: tok.grammar_compiler, tok.vocab_size)
    mask.add_request("r", SamplingParams(grammar=grammar))
    return mask


def test_grammar_state_after_rejected_drafts_equals_accepted_prefix(smollm2) -> None:
    tok = smollm2.tokenizer
    grammar = tok.grammar_compiler.compile(GrammarSpec("choice", json.dumps(["red apple pie", "red bean soup", "blue"])))
    text = tok.encode_text("red apple pie")
    other = tok.encode_text("red bean soup")
    mask = _mask_for(tok, grammar)
    outputs = text[:1]
    for k in range(len(other)):  # a verifier and drafter walk over a draft that will be rejected
        mask.allowed("r", outputs, other[1: 1 + k])
    after = mask.allowed("r", outputs, [])
    fresh = _mask_for(tok, grammar).allowed("r", outputs, [])
    assert bool((after == fresh).all())
    # the accepted prefix grows by one token, then a step is rolled back (outputs shrink)
    assert bool((mask.allowed("r", text[:2], []) == _mask_for(tok, grammar).allowed("r", text[:2], [])).all())
    assert bool((mask.allowed("r", outputs, []) == fresh).all())
    assert not bool(fresh[tok.encode_text("blue")[0]]) or tok.encode_text("blue")[0] == text[0]


class _ScriptedDrafter(TokenDrafter):
    """Proposes a fixed block (one-hot q) ignoring any mask: the engine must cut what the grammar forbids."""

    name = "scripted"

    def __init__(self, block: list[int], vocab: int) -> None:
        self.num_speculative_tokens = len(block)
        self.block = block
        self.vocab = vocab
        self.proposed: list[list[int]] = []

    def propose(self, batch) -> DraftOutput:
        import torch
        tokens = torch.tensor([self.block] * batch.num_rows, dtype=torch.int64)
        free = batch.free_rows
        q = torch.nn.functional.one_hot(tokens[free], self.vocab).float() if free else None
        return DraftOutput(tokens, q, torch.full(tokens.shape, 0.9))


def test_forbidden_draft_is_cut_before_verification(smollm2) -> None:
    tok = smollm2.tokenizer
    digits = tok.grammar_compiler.compile(GrammarSpec("regex", "[0-9]{4}"))
    block = [tok.encode_text("1")[0], tok.encode_text("x")[0], tok.encode_text("2")[0]]
    drafter = _ScriptedDrafter(block, smollm2.config.vocab_size)
    core = EngineCore(_args(verify_policy="fixed:3"), loaded=smollm2, drafter=drafter)
    seen: list[tuple[int, ...]] = []
    verify = core.runner.verifier.verify
    core.runner.verifier.verify = lambda inp: (seen.append(tuple(inp.drafts.token_ids.tolist())), verify(inp))[1]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=tok.stop_token_ids, grammar=digits)
    out = core.generate_batch([_prompt(tok, "Pick a number.")], params)[0]
    assert all(block[1] not in drafts for drafts in seen) and any(drafts == (block[0],) for drafts in seen), seen
    assert tok.decode(out).isdigit() and len(tok.decode(out)) == 4


def test_bad_grammar_is_a_grammar_error_and_cached(smollm2) -> None:
    compiler = smollm2.tokenizer.grammar_compiler
    for spec in (GrammarSpec("regex", "(unclosed"), GrammarSpec("json_schema", json.dumps({"type": "nonsense"}))):
        with pytest.raises(GrammarError) as first:
            compiler.compile(spec)
        with pytest.raises(GrammarError) as second:
            compiler.compile(spec)
        assert first.value is second.value and str(first.value)


def test_compilation_time_limit(smollm2, monkeypatch) -> None:
    import threading

    from sparkserve.engine.structured import grammar as grammar_module

    release = threading.Event()
    monkeypatch.setattr(grammar_module, "_build", lambda compiler, spec: release.wait())
    compiler = smollm2.tokenizer.grammar_compiler
    monkeypatch.setattr(compiler, "timeout_s", 0.01)
    try:
        with pytest.raises(GrammarError, match="exceeded the 0.01 s limit"):
            compiler.compile(GrammarSpec("regex", "[a-z]{3} never compiled"))
    finally:
        release.set()


# ---------------------------------------------------------------- the OpenAI API
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(smollm2):
    engine = AsyncEngine(EngineCore(_args(verify_policy="fixed:4"), loaded=smollm2, profile=ThroughputProfile.load(PROFILE)))
    with run_server(engine, served_model_name="smol") as running:
        yield running


def test_api_json_schema_streamed_and_not(server) -> None:
    client = server.openai()
    schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    kw = dict(model="smol", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=MAX_TOKENS,
              temperature=0.0, response_format=fmt)
    reply = client.chat.completions.create(**kw)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    obj = client.chat.completions.create(**{**kw, "response_format": {"type": "json_object"},
                                            "messages": [{"role": "user", "content": QUESTIONS[3]}]})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert obj.choices[0].message.content.startswith("{")
    choice = client.chat.completions.create(**{k: v for k, v in kw.items() if k != "response_format"},
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(model="smol", prompt="The year is", max_tokens=8, temperature=0.0,
                                      extra_body={"guided_regex": "[0-9]{4}"})
    assert regex.choices[0].text.isdigit() and len(regex.choices[0].text) == 4


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_api_tool_calls_named_and_required(server, tool_choice) -> None:
    client = server.openai()
    kw = dict(model="smol", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tools=[WEATHER, TIME], tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=64, temperature=0.0)
    reply = client.chat.completions.create(**kw)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id and deltas[0].type == "function" and all(d.index == 0 for d in deltas)
    assert deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_api_bad_schema_is_400_before_any_sse_byte(server) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {server.api_key}"}) as r:
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
        error = json.loads(r.read())["error"]
    assert error["param"] == "response_format" and "nonsense" in error["message"]
    named = {**body, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    named.pop("response_format")
    assert httpx.post(f"{server.url}/v1/chat/completions", json=named).status_code == 400


def test_required_tool_grammar_takes_parallel_calls_in_schema_order(smollm2) -> None:
    tok = smollm2.tokenizer
    req = ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "x"}], tools=[WEATHER, TIME],
                                tool_choice="required")
    key = tok.grammar_compiler.compile(grammar_spec(req))
    calls = [{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", "arguments": {"city": "P", "unit": "celsius"}}]
    text = "\n".join(f"<tool_call>{json.dumps(c, separators=(',', ':'))}</tool_call>" for c in calls)
    ids = tok.encode_text(text) + [tok.eos_token_id]
    assert tok.grammar_compiler.matcher(key).consume(ids) == len(ids)
    wrong = tok.encode_text('<tool_call>{"name":"get_time","arguments":{"zone":"CET","extra":1}}</tool_call>')
    assert tok.grammar_compiler.matcher(key).consume(wrong) < len(wrong)


def test_tool_message_round_trip_renders_through_template(smollm2) -> None:
    tok = smollm2.tokenizer
    req = ChatCompletionRequest(model="smol", tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}])
    messages, extra = chat_messages(req, tok.chat_template)
    text = tok.apply_chat_template(messages, **extra)
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text
    assert "<tool_response>\n18 degrees\n</tool_response>" in text
    assert tok.encode_chat(messages, **extra)  # tokenizes with markup-only special tokens


# ---------------------------------------------------------------- the Hermes parser
CANNED = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')


def _stream(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser = HermesStreamParser()
    content, calls = "", {}
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += delta.content
        for d in delta.tool_calls:
            name, args = calls.get(d.index, ("", ""))
            calls[d.index] = (name + (d.function.name or ""), args + (d.function.arguments or ""))
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text", [CANNED, "No tools needed, plain <tool answer.", 'x <tool_call>{"bad json</tool_call> y'])
def test_auto_parsing_streams_split_at_every_boundary(text) -> None:
    content, calls = parse_tool_calls(text)
    expected = [(c.function.name, c.function.arguments) for c in calls]
    for cut in range(len(text) + 1):
        got_content, got_calls = _stream([text[:cut], text[cut:]])
        assert got_calls == expected, cut
        assert got_content.strip() == (content or "").strip(), cut
    char_content, char_calls = _stream(list(text))
    assert char_calls == expected and char_content.strip() == (content or "").strip()
    if text == CANNED:
        assert content == "Let me check." and [json.loads(a) for _, a in expected] == [
            {"city": "Paris", "unit": "celsius"}, {"zone": "CET"}]
