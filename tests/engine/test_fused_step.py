"""The fused decode step (kernels/fused_cpu.py, ``LlamaForCausalLM.fused_step``) on the real SmolLM2: greedy
text equals the eager layers' or parts at a near-tie (DESIGN.md section 7), fp32 and bf16 (the default
server's GGUF int4 + bf16), batched decode, and speculative verify blocks (fp32); the fused ops really serve those
steps, and prefill chunks keep the eager layers (except in batch-invariant mode, where every step runs fused)."""

from __future__ import annotations

import pytest
import torch

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.batch_invariant import batch_invariant_mode
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import LoadedModel, default_model_path, load_model
from sparkserve.kernels import fused_cpu
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.batch_invariance import count_fused_attention_rows
from sparkserve.testing.exactness import NEAR_TIE_EPS, assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.tiny import tiny_target

pytestmark = pytest.mark.skipif(not fused_cpu.load(), reason="fused CPU extension not built (scripts/setup.sh)")

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain."]
MAX_TOKENS = 12
NEAR_TIE = {"float32": NEAR_TIE_EPS, "bfloat16": 0.5}  # bf16: the contract's rule in nats (tests/engine/test_quant.py)


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2) -> LoadedModel:
    """The default server's model: the Q4_1 GGUF in bf16 with its int4 blocks kept (``auto``)."""
    return load_model(default_model_path(), dtype=torch.bfloat16, quantization="auto")


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the fused attention op's calls (one per layer of a fused step)."""
    return count_fused_attention_rows(monkeypatch)


def _generate(loaded: LoadedModel, dtype: str, fused: bool, prompts: list[list[int]], **kw: object) -> list[list[int]]:
    settings: dict[str, object] = {"drafter": "none", "num_kv_blocks": 128, "max_num_seqs": 4, "cpu_plan": False,
                                   "batch_invariant": False, **kw}  # the fused decode beside eager prefill
    args = EngineArgs(dtype=dtype, **settings)  # type: ignore[arg-type]
    core = EngineCore(args, loaded=loaded)
    loaded.model.fused_step = fused
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return core.generate_batch(prompts, params, request_prefix=f"fused-{fused}")
    finally:
        loaded.model.fused_step = True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_greedy_equals_eager(smollm2, smollm2_bf16, fused_calls, dtype: str) -> None:
    loaded = smollm2 if dtype == "float32" else smollm2_bf16
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    eager = _generate(loaded, dtype, False, prompts)
    assert not fused_calls
    fused = _generate(loaded, dtype, True, prompts)
    num_layers = loaded.config.num_hidden_layers
    assert len(fused_calls) >= num_layers * (MAX_TOKENS - 1) and max(fused_calls) == len(prompts)  # batched decode
    speculative = None
    if dtype == "float32":  # verify blocks (1 + 3 rows per sequence) through the fused ops
        spec_calls = len(fused_calls)
        speculative = _generate(loaded, dtype, True, prompts, drafter=None, verify_policy="fixed:3", spec_guard=False)
        assert any(rows > len(prompts) for rows in fused_calls[spec_calls:])
    loaded.model.fused_step = False
    try:
        for i, prompt in enumerate(prompts):
            gap_at = top2_gap_fn(loaded.model, prompt, eager[i])
            eps = NEAR_TIE[dtype]
            assert_same_or_near_tie(fused[i], eager[i], gap_at, eps, label=f"{dtype} fused prompt {i}")
            if speculative is not None:
                assert_same_or_near_tie(speculative[i], eager[i], gap_at, eps, label=f"{dtype} fused + DSpark prompt {i}")
    finally:
        loaded.model.fused_step = True


def test_prefill_keeps_the_eager_layers_except_in_batch_invariant_mode(fused_calls) -> None:
    """A tiny target's decode step runs fused and a prefill chunk eagerly; in batch-invariant mode both run fused
    (one path for every row: engine/batch_invariant.py ``fused_rows_metadata``)."""
    model = tiny_target(head_dim=16).model
    caches = [new_kv_cache(16, 4, 2, 16, torch.float32) for _ in model.layers]
    decode = build_attention_metadata([1, 1], [5, 9], [6, 10], [[0, 1], [2, 3, 4]], 4)
    ids, positions = torch.tensor([3, 4]), torch.tensor([5, 9])
    model(ids, positions, caches, decode)
    assert len(fused_calls) == len(model.layers)
    prefill = build_attention_metadata([20], [0], [20], [[5, 6, 7, 8, 9]], 4)
    model(torch.arange(2, 22), torch.arange(20), caches, prefill)
    assert len(fused_calls) == len(model.layers)
    with batch_invariant_mode(True):
        model(ids, positions, caches, decode)
        model(torch.arange(2, 22), torch.arange(20), caches, prefill)
    assert fused_calls[len(model.layers):] == [2] * len(model.layers) + [20] * len(model.layers)
