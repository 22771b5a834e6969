"""A plain batched sampling loop over the target's paged forward, for data generation where the engine
cannot run (the engine's runner is CPU-only today; this loop runs on any device).

Same sampling rule as DeepSpec's data regeneration (temperature, then top-k, then top-p nucleus).
Sequences are laid out in disjoint, contiguous block ranges of one paged KV pool; prefill is one
forward over all prompts, then each decode step feeds every unfinished sequence's last token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.models.llama import LlamaForCausalLM

PAGE = 16


def sample_next(logits: Tensor, temperature: float, top_p: float, top_k: int | None,
                generator: torch.Generator | None) -> Tensor:
    """logits: [R, V] fp32 -> [R] int64. temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_paged(model: LlamaForCausalLM, prompts: list[list[int]], max_tokens: int, stop_ids: set[int],
                   temperature: float, top_p: float, top_k: int | None, seed: int) -> list[list[int]]:
    """Sample up to ``max_tokens`` tokens per prompt (a stop token is kept and ends the sequence)."""
    device = model.embed_tokens.weight.device
    cfg, dtype = model.config, model.embed_tokens.weight.dtype
    lens = [len(p) for p in prompts]
    need = [-(-(n + max_tokens) // PAGE) for n in lens]
    tables, first = [], 0
    for n in need:
        tables.append(list(range(first, first + n)))
        first += n
    caches = [new_kv_cache(first, PAGE, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
              for _ in range(cfg.num_hidden_layers)]
    gen = torch.Generator(device=device).manual_seed(seed)
    meta = build_attention_metadata(lens, [0] * len(prompts), lens, tables, PAGE, device=device)
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden, _ = model(ids, pos, caches, meta)
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    tokens = sample_next(model.compute_logits(hidden[last]), temperature, top_p, top_k, gen).tolist()
    outputs: list[list[int]] = [[t] for t in tokens]
    active = [i for i, t in enumerate(tokens) if t not in stop_ids and max_tokens > 1]
    while active:
        starts = [lens[i] + len(outputs[i]) - 1 for i in active]
        meta = build_attention_metadata([1] * len(active), starts, [s + 1 for s in starts],
                                        [tables[i] for i in active], PAGE, device=device)
        ids = torch.tensor([outputs[i][-1] for i in active], device=device)
        hidden, _ = model(ids, torch.tensor(starts, device=device), caches, meta)
        new = sample_next(model.compute_logits(hidden), temperature, top_p, top_k, gen).tolist()
        still = []
        for i, t in zip(active, new, strict=True):
            outputs[i].append(t)
            if t not in stop_ids and len(outputs[i]) < max_tokens:
                still.append(i)
        active = still
    return outputs
