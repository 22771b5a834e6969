"""Draft-model drafter: an independent small causal LM with the target's tokenizer (baseline).

It drafts gamma tokens one by one (Leviathan et al. 2023). This baseline keeps no KV cache between
steps: every proposal re-prefills each request's token history into a private scratch cache, then runs
gamma batched decode steps. That is O(context) per step, acceptable for the small draft models it is
meant for and simple enough to be obviously right; the DSpark drafter is the production path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.loader import load_model
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.spec_decode.draft_sampling import SlotSampler
from sparkserve.engine.spec_decode.drafter import DraftBatch, DraftOutput, TokenDrafter


class DraftModelDrafter(TokenDrafter):
    """Drafts with a small causal LM (``Drafter`` Protocol).

    Args:
        model: the draft LM (same vocabulary as the target).
        num_draft_tokens: gamma.
        block_size: tokens per block of its private scratch cache.
    """

    name = "draft-model"

    def __init__(self, model: LlamaForCausalLM, num_draft_tokens: int, block_size: int = 16) -> None:
        if num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        self.model = model
        self.num_speculative_tokens = num_draft_tokens
        self.kv_block_size = block_size

    @classmethod
    def load(cls, path: str | Path, num_draft_tokens: int, dtype: torch.dtype, target_vocab: int,
             device: torch.device | str = "cpu") -> DraftModelDrafter:
        """Load a HF folder or GGUF draft model on ``device``; its vocabulary must match the target's."""
        loaded = load_model(path, dtype=dtype, device=device)
        if loaded.config.vocab_size != target_vocab:
            raise ValueError(f"draft model vocabulary {loaded.config.vocab_size} != target's {target_vocab}")
        return cls(loaded.model, num_draft_tokens)

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> DraftOutput:
        """Draft gamma tokens for each history (prompt + outputs, anchor last): a re-prefill of every
        history into a scratch cache, then gamma - 1 batched decode steps. No confidences."""
        histories = batch.token_histories
        if histories is None:
            raise ValueError("the draft-model drafter needs token histories")
        gamma = self.num_speculative_tokens
        cfg = self.model.config
        bs = self.kv_block_size
        lengths = [len(h) for h in histories]
        tables, first = [], 0
        for n in lengths:
            nb = -(-(n + gamma) // bs)
            tables.append(list(range(first, first + nb)))
            first += nb
        dtype = self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        caches = [new_kv_cache(first, bs, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
        ids = torch.tensor([t for h in histories for t in h], device=device)
        pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
        meta = build_attention_metadata(lengths, [0] * len(lengths), lengths, tables, bs, device=device)
        hidden, _ = self.model(ids, pos, caches, meta)
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last])  # [R, V]
        sampler = SlotSampler(batch, gamma, device)
        for k in range(gamma):
            tok = sampler.draw(logits)
            if k + 1 == gamma:
                break
            step_meta = build_attention_metadata([1] * len(lengths), [n + k for n in lengths],
                                                 [n + k + 1 for n in lengths], tables, bs, device=device)
            positions = torch.tensor([n + k for n in lengths], device=device)
            hidden, _ = self.model(tok, positions, caches, step_meta)
            logits = self.model.compute_logits(hidden)
        tokens, probs, num_tokens = sampler.result()
        return DraftOutput(tokens, probs, None, num_tokens)
