"""Engine end to end on the real SmolLM2-135M (fp32): reference equality, batching invariance,
preemption and real paging (DESIGN.md section 7 rule, epsilon in sparkserve/testing/exactness.py)."""

from __future__ import annotations

import pytest

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Name a famous painter and one of their works, and say why the work matters to art history.",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one, in a few words.",
    "Write a Python function that returns the square of a number.",
    "What is the boiling point of water at sea level in Celsius and Fahrenheit?",
    "Suggest a name for a bakery.",
    "hi",
    "Summarize the plot of Romeo and Juliet briefly.",
    "What are the primary colors?",
    "How many legs does a spider have?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[list[int]]:
    tok = smollm2.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]


def _core(smollm2, **kw) -> EngineCore:
    args = EngineArgs(dtype="float32", drafter="none", num_kv_blocks=kw.pop("num_kv_blocks", 512), block_size=16,
                      max_num_batched_tokens=kw.pop("max_num_batched_tokens", 256), **kw)
    return EngineCore(args, loaded=smollm2)


def _params(stop_ids) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=tuple(stop_ids))


@pytest.fixture(scope="module")
def alone(smollm2, prompts) -> list[list[int]]:
    """Each prompt's greedy output when it runs alone in the engine."""
    core = _core(smollm2)
    params = _params(smollm2.tokenizer.stop_token_ids)
    return [core.generate_batch([p], params, request_prefix=f"alone{i}")[0] for i, p in enumerate(prompts)]


def test_paris(smollm2, prompts, alone) -> None:
    text = smollm2.tokenizer.decode(alone[0])
    assert "Paris" in text, text


def test_alone_equals_reference_loop(smollm2, prompts, alone) -> None:
    from sparkserve.testing.reference import greedy_reference

    stop = set(smollm2.tokenizer.stop_token_ids)
    for i in (0, 5, 13):
        ref = greedy_reference(smollm2.model, prompts[i], MAX_TOKENS, stop)
        assert_same_or_near_tie(alone[i], ref.token_ids, lambda j, r=ref: r.top2_gaps[j], label=QUESTIONS[i])


def _check_batch(smollm2, prompts, alone, outputs, label) -> int:
    identical = 0
    for i, out in enumerate(outputs):
        gap = top2_gap_fn(smollm2.model, prompts[i], alone[i])
        identical += assert_same_or_near_tie(out, alone[i], gap, label=f"{label}[{i}]")
    return identical


def test_batch_invariance(smollm2, prompts, alone) -> None:
    core = _core(smollm2)
    outputs = core.generate_batch(prompts, _params(smollm2.tokenizer.stop_token_ids))
    assert _check_batch(smollm2, prompts, alone, outputs, "batch16") >= len(prompts) - 2


def test_preemption_and_shuffled_blocks(smollm2, prompts, alone) -> None:
    # 24 blocks of 16 tokens cannot hold 17 running sequences of ~60 tokens: preemption must happen.
    core = _core(smollm2, num_kv_blocks=24, shuffle_blocks=True, max_num_batched_tokens=128)
    outputs = core.generate_batch(prompts, _params(smollm2.tokenizer.stop_token_ids))
    assert core.scheduler.num_preemptions_total > 0
    assert _check_batch(smollm2, prompts, alone, outputs, "preempt") >= len(prompts) - 2
    assert core.scheduler.kv_cache_usage == 0.0
