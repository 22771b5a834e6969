"""Prompt logprobs on the real SmolLM2-135M: equal to a fresh causal forward's log-softmax over chunked
prefill, with speculation on and off, and again when the prompt's prefix is already cached."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from sparkserve.engine.async_engine import AsyncEngine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.reference import reference_all_logits

PROFILE = Path(__file__).resolve().parents[2] / "data" / "profile_small.json"
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. One, two, three, four, five, six, seven.")


async def _run(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list:
    await engine.start()
    try:
        return [out async for out in await engine.add_request("r0", prompt, params)] + [
            out async for out in await engine.add_request("r1", prompt, params)]  # r1: prefix now cached
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("drafter", [None, "none"])  # None: the shipped drafter (speculation on)
def test_prompt_logprobs_equal_a_fresh_forward(smollm2, drafter: str | None) -> None:
    args = EngineArgs(dtype="float32", num_kv_blocks=64, block_size=16, max_num_batched_tokens=24, max_num_seqs=4,
                      drafter=drafter, enable_prefix_caching=True)
    engine = AsyncEngine(EngineCore(args, loaded=smollm2, profile=ThroughputProfile.load(PROFILE)))
    prompt = smollm2.tokenizer.encode(TEXT + " " + TEXT)
    assert len(prompt) > 2 * args.max_num_batched_tokens  # several prefill chunks
    outs = asyncio.run(_run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2)))
    expected = torch.log_softmax(reference_all_logits(smollm2.model, prompt), dim=-1)  # [L, V]
    firsts = [o for o in outs if o.prompt_logprobs is not None]
    assert len(firsts) == 2  # once per request, on its first output
    for first in firsts:
        entries = first.prompt_logprobs
        assert [e.token_id for e in entries] == prompt[1:]
        got = torch.tensor([e.logprob for e in entries])
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        top = expected[: len(prompt) - 1].topk(2, dim=-1)
        assert all(len(e.top) == 2 for e in entries)
        torch.testing.assert_close(torch.tensor([[v for _, v in e.top] for e in entries]), top.values, atol=1e-4, rtol=0)
    assert all(o.num_cached_tokens == 0 for o in outs)  # the cache was bypassed, not used


def test_requests_without_prompt_logprobs_get_none(smollm2) -> None:
    args = EngineArgs(dtype="float32", num_kv_blocks=64, block_size=16, max_num_batched_tokens=64, max_num_seqs=4,
                      drafter="none")
    engine = AsyncEngine(EngineCore(args, loaded=smollm2, profile=ThroughputProfile.load(PROFILE)))
    prompt = smollm2.tokenizer.encode(TEXT)
    outs = asyncio.run(_run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=2)))
    assert all(o.prompt_logprobs is None for o in outs)
    assert engine.core.runner.prompt_logprobs.active == {}
