"""``/v1/completions`` with ``echo``, prompt logprobs, ``max_tokens: 0`` and vLLM's ``prompt_logprobs``,
against the fake engine (prompt logprobs -1.0 after the first token; see ``FakeEngine``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sparkserve.testing.fake_engine import DEFAULT_REPLY, EOS, FakeTokenizer
from sparkserve.testing.server_harness import RunningServer, run_server

MODEL = "fake-model"
TOK = FakeTokenizer()
PROMPT = "Hello, world! Score me."


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with run_server() as running:
        yield running


def _post(srv: RunningServer, **body: object) -> dict:
    with srv.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _stream(srv: RunningServer, **body: object) -> list[dict]:
    with srv.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True, **body})
    assert r.status_code == 200, r.text
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _check_offsets(logprobs: dict, text: str) -> None:
    assert "".join(logprobs["tokens"]) == text
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]


def test_echo_prepends_the_prompt(srv: RunningServer) -> None:
    choice = srv.openai().completions.create(model=MODEL, prompt=PROMPT, echo=True).choices[0]
    assert choice.text == PROMPT + DEFAULT_REPLY and choice.finish_reason == "stop"
    assert list(srv.engine.params.values())[-1].prompt_logprobs is None  # echo without logprobs: none computed
    ids = TOK.encode(PROMPT)
    by_ids = _post(srv, prompt=ids, echo=True, max_tokens=2)["choices"][0]
    assert by_ids["text"] == PROMPT + TOK.decode(TOK.encode(DEFAULT_REPLY)[:2])


def test_echo_logprobs_cover_the_prompt_first_null(srv: RunningServer) -> None:
    body = _post(srv, echo=True, logprobs=1, max_tokens=3)
    choice, prompt = body["choices"][0], TOK.encode(PROMPT)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1: len(prompt)] == [-1.0] * (len(prompt) - 1)
    assert lp["top_logprobs"][1] == {TOK.decode([prompt[1]]): -1.0}
    assert lp["token_logprobs"][len(prompt):] == [-0.5] * 3  # the generated tokens (fake values)
    _check_offsets(lp, choice["text"])
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_scores_without_generating(srv: RunningServer, stream: bool) -> None:
    kw = dict(echo=True, logprobs=2, max_tokens=0)
    if stream:
        chunks = _stream(srv, **kw, stream_options={"include_usage": True})
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        text = "".join(c["text"] for c in choices)
        tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
        finish, usage = choices[-1]["finish_reason"], chunks[-1]["usage"]
    else:
        body = _post(srv, **kw)
        choice = body["choices"][0]
        text, tokens, finish, usage = choice["text"], choice["logprobs"]["tokens"], choice["finish_reason"], body["usage"]
        assert choice["logprobs"]["top_logprobs"][1] == {TOK.decode([TOK.encode(PROMPT)[1]]): -1.0, "<|endoftext|>": -3.0}
    assert text == PROMPT and len(tokens) == len(TOK.encode(PROMPT)) and finish == "length"
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"]


def test_streamed_echo_equals_the_whole_response(srv: RunningServer) -> None:
    kw = dict(echo=True, logprobs=1, max_tokens=6, prompt=[PROMPT, "Another one."], n=2)
    whole = _post(srv, **kw)["choices"]
    chunks = _stream(srv, **kw)
    for choice in whole:
        parts = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for p in parts for x in p["logprobs"][name]] == choice["logprobs"][name]
        assert choice["text"].startswith(PROMPT if choice["index"] < 2 else "Another one.")


def test_vllm_prompt_logprobs(srv: RunningServer) -> None:
    choice = _post(srv, prompt_logprobs=1, max_tokens=1)["choices"][0]
    prompt = TOK.encode(PROMPT)
    assert choice["text"] == TOK.decode(TOK.encode(DEFAULT_REPLY)[:1])  # no echo: prompt text not repeated
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    assert entries[1] == {str(prompt[1]): {"logprob": -1.0, "rank": 1, "decoded_token": TOK.decode([prompt[1]])}}
    two = _post(srv, prompt_logprobs=2, max_tokens=1)["choices"][0]["prompt_logprobs"][1]
    assert two[str(EOS)] == {"logprob": -3.0, "rank": 2, "decoded_token": "<|endoftext|>"}
    assert _post(srv, max_tokens=1)["choices"][0]["prompt_logprobs"] is None
    assert list(srv.engine.params.values())[-1].prompt_logprobs is None  # not asked: the engine computes none
