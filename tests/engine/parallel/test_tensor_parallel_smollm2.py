"""Tensor parallelism on the real SmolLM2-135M (9 query heads, 3 KV heads: TP = 3, three processes on
gloo): greedy outputs against TP = 1 identical or parting at a near-tie (DESIGN.md section 7), with and
without speculation (the shipped DSpark drafter, fixed verify budget 3), and seeded sampling the same. The
server's teardown (signals, a killed or diverged worker): test_tensor_parallel_teardown.py."""

from __future__ import annotations

import pytest
import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.reference import reference_logits

pytestmark = pytest.mark.slow

# One TP = 3 start serves both paths (each start loads the model three times): the plain greedy request is
# speculated (the shipped DSpark drafter, fixed verify budget 3); the one with a presence penalty is never
# drafted (scheduler/request_rules.may_draft), so it decodes without speculation.
PARAMS = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=0.0, presence_penalty=0.5, max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)]
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def _args(tp: int) -> EngineArgs:
    return EngineArgs(dtype="float32", num_kv_blocks=64, block_size=16, max_num_seqs=4, cpu_plan=False,
                      verify_policy="fixed:3", tensor_parallel_size=tp, num_threads=1, quantization="none")


def test_tp3_matches_tp1(smollm2) -> None:
    prompts = [smollm2.tokenizer.encode(text) for text in TEXTS]
    expected = EngineCore(_args(1), loaded=smollm2).generate_batch(prompts, PARAMS)
    core = EngineCore(_args(3))  # every rank loads the embedded model and its drafter itself
    steps: list = []
    try:
        outputs = core.generate_batch(prompts, PARAMS, steps=steps)
    finally:
        core.close()
    assert sum(s.scheduler.num_drafting for s in steps) > 0  # the speculative path ran
    ref = expected[0]
    assert_same_or_near_tie(outputs[0], ref, top2_gap_fn(smollm2.model, prompts[0], ref), label="speculated")
    ref = expected[1]
    assert_same_or_near_tie(outputs[1], ref, _penalised_gap(smollm2.model, prompts[1], ref, 0.5), label="plain")
    assert outputs[2] == expected[2]  # seeded sampling


def _penalised_gap(model, prompt: list[int], reference: list[int], presence: float):  # noqa: ANN001, ANN202
    """``top2_gap_fn`` for a greedy request with a presence penalty: the gap of the logits it chose from."""

    def gap(i: int) -> float:
        logits = reference_logits(model, prompt + reference[:i]).clone()
        if i:
            logits[torch.tensor(sorted(set(reference[:i])))] -= presence
        top2 = torch.topk(logits, 2).values
        return float(top2[0] - top2[1])

    return gap
