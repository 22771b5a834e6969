"""A plain one-sequence greedy reference loop (no batching, no KV reuse), for exactness tests.

Every step recomputes the whole sequence from scratch with one causal prefill, so it shares no
batching, chunking, paging or speculation logic with the engine. It also records, at every step,
the gap between the two largest logits: DESIGN.md section 7 allows an engine output to part from
the reference only where that gap is below a stated epsilon (a floating-point near-tie).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class ReferenceResult:
    """Greedy continuation and its top-2 logit gaps.

    Attributes:
        token_ids: generated tokens (stops included, nothing after).
        top2_gaps: per generated position, logit[top1] - logit[top2] of the reference.
    """

    token_ids: list[int]
    top2_gaps: list[float]


@torch.inference_mode()
def reference_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """Next-token logits after ``token_ids`` from one fresh causal forward. Returns [V] fp32."""
    return reference_all_logits(model, token_ids, last_only=True)[0]


@torch.inference_mode()
def reference_prompt_logprobs(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """``[L - 1]`` natural-log probability of each token after the first, given the ones before it,
    from one fresh causal forward (the oracle of prompt logprobs)."""
    logprobs = torch.log_softmax(reference_all_logits(model, token_ids)[:-1], dim=-1)  # [L - 1, V]
    return logprobs.gather(1, torch.tensor(token_ids[1:])[:, None]).squeeze(1)


@torch.inference_mode()
def reference_all_logits(model: LlamaForCausalLM, token_ids: list[int], last_only: bool = False) -> torch.Tensor:
    """``[L, V]`` fp32 logits at every position of ``token_ids`` (``[1, V]``, the last, with ``last_only``)
    from one fresh causal forward."""
    cfg = model.config
    n = len(token_ids)
    block_size = 16
    num_blocks = (n + block_size - 1) // block_size
    dtype = model.embed_tokens.weight.dtype
    caches = [new_kv_cache(num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype)
              for _ in range(cfg.num_hidden_layers)]
    meta = build_attention_metadata([n], [0], [n], [list(range(num_blocks))], block_size)
    ids = torch.tensor(token_ids, dtype=torch.int64)
    hidden, _ = model(ids, torch.arange(n), caches, meta)
    return model.compute_logits(hidden[-1:] if last_only else hidden).float()


def greedy_reference(
    model: LlamaForCausalLM, prompt_ids: list[int], max_tokens: int, stop_ids: set[int] | frozenset[int] = frozenset()
) -> ReferenceResult:
    """Greedy decode ``max_tokens`` tokens by full recomputation (stops at a stop id)."""
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(max_tokens):
        logits = reference_logits(model, prompt_ids + tokens)
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        token = int(torch.argmax(logits))
        tokens.append(token)
        if token in stop_ids:
            break
    return ReferenceResult(tokens, gaps)
