"""The client-facing features on the real SmolLM2-135M behind a live server, speculation on (the
shipped drafter; tests/engine/sampling/test_prompt_logprobs.py covers the engine with it off): echo + logprobs scores equal a direct computation from one fresh forward,
and a tool without parameters gives a parsed ``{}`` call instead of running away."""

from __future__ import annotations

import json

import pytest
import torch

from sparkserve.testing.reference import reference_prompt_logprobs
from sparkserve.testing.server_harness import RunningServer

PROMPT = "Question: What is the capital of France?\nAnswer: Paris"


@pytest.fixture
def server(smol_server: RunningServer) -> RunningServer:
    return smol_server


@pytest.mark.parametrize("max_tokens", [0, 1])  # lm-eval sends either with echo, depending on its version
def test_echo_scores_equal_a_direct_computation(server: RunningServer, smollm2, max_tokens: int) -> None:
    client = server.openai()
    for _ in range(2):  # the second time the prompt's prefix is cached: still scored
        choice = client.completions.create(model="smol", prompt=PROMPT, echo=True, logprobs=1, max_tokens=max_tokens,
                                           temperature=0.0).choices[0]
        ids = smollm2.tokenizer.encode(PROMPT)
        lp = choice.logprobs
        assert choice.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None
        want = reference_prompt_logprobs(smollm2.model, ids)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1: len(ids)]), want, atol=1e-4, rtol=0)
        # lm-eval's is_greedy reads top_logprobs: each holds the best token, at least as likely as the prompt's
        tops = lp.top_logprobs[1: len(ids)]
        assert all(len(top) == 1 and max(top.values()) >= got - 1e-6 for top, got in zip(tops, lp.token_logprobs[1:], strict=False))


@pytest.mark.parametrize("stream", [False, True])
def test_tool_without_parameters_yields_empty_arguments(server: RunningServer, stream: bool) -> None:
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The current time."}},
             {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object"}}}]
    kw = dict(model="smol", messages=[{"role": "user", "content": "What time is it?"}], tools=tools,
              tool_choice="required", parallel_tool_calls=False, max_tokens=48, temperature=0.0)
    client = server.openai()
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        assert deltas[0].function.name in ("get_time", "list_files")
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        return
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {}
