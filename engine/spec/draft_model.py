"""Draft-model drafter: an independent small causal LM with the target's tokenizer (baseline).

It drafts gamma tokens one by one (Leviathan et al. 2023). This baseline keeps no KV cache between
steps: every proposal re-prefills each request's token history into a private scratch cache, then runs
gamma batched decode steps. That is O(context) per step, acceptable for the small draft models it is
meant for and simple enough to be obviously right; the DSpark drafter is the production path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import build_attention_metadata, new_kv_cache
from engine.loader import load_model
from engine.models.llama import LlamaForCausalLM
from engine.spec.dspark import DraftOutput

_GREEDY = 1e-5


@dataclass(frozen=True)
class DraftModelConfig:
    """What the speculator reads: ``block_size`` = gamma; no target features, no shared KV pool."""

    block_size: int
    target_layer_ids: tuple[int, ...] = ()
    num_hidden_layers: int = 0
    num_key_value_heads: int = 1
    head_dim: int = 1
    markov_rank: int = 0


class DraftModelDrafter:
    """Drafts with a small causal LM.

    Args:
        model: the draft LM (same vocabulary as the target).
        num_draft_tokens: gamma.
    """

    needs_token_history = True

    def __init__(self, model: LlamaForCausalLM, num_draft_tokens: int, block_size: int = 16) -> None:
        if num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        self.model = model
        self.config = DraftModelConfig(num_draft_tokens)
        self.kv_block_size = block_size

    @classmethod
    def load(cls, path: str | Path, num_draft_tokens: int, dtype: torch.dtype, target_vocab: int) -> DraftModelDrafter:
        """Load a HF folder or GGUF draft model; its vocabulary must match the target's."""
        loaded = load_model(path, dtype=dtype)
        if loaded.config.vocab_size != target_vocab:
            raise ValueError(f"draft model vocabulary {loaded.config.vocab_size} != target's {target_vocab}")
        return cls(loaded.model, num_draft_tokens)

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list:
        return []

    def add_context(self, features, positions, slot_mapping, kv_caches) -> None:
        return None

    @torch.inference_mode()
    def propose(self, anchor_ids, starts, block_tables, block_size, kv_caches, temperatures: torch.Tensor,
                generators, token_histories: list[list[int]]) -> DraftOutput:
        """Draft gamma tokens for each history (prompt + outputs, anchor last). Returns tokens [R, gamma],
        q [R, gamma, V] fp32 (None if all greedy) and no confidences."""
        gamma = self.config.block_size
        cfg = self.model.config
        bs = self.kv_block_size
        lengths = [len(h) for h in token_histories]
        per_seq = [-(-(n + gamma) // bs) for n in lengths]
        tables, first = [], 0
        for nb in per_seq:
            tables.append(list(range(first, first + nb)))
            first += nb
        dtype = self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        caches = [new_kv_cache(first, bs, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
        greedy = (temperatures < _GREEDY).tolist()
        temps = torch.where(temperatures < _GREEDY, 1.0, temperatures.float())
        ids = torch.tensor([t for h in token_histories for t in h], device=device)
        pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
        meta = build_attention_metadata(lengths, [0] * len(lengths), lengths, tables, bs, device=device)
        hidden, _ = self.model(ids, pos, caches, meta)
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last])  # [R, V]
        tokens, qs = [], []
        for k in range(gamma):
            tok, q = self._draw(logits, greedy, temps, generators)
            tokens.append(tok)
            qs.append(q)
            if k + 1 == gamma:
                break
            step_meta = build_attention_metadata([1] * len(lengths), [n + k for n in lengths],
                                                 [n + k + 1 for n in lengths], tables, bs, device=device)
            positions = torch.tensor([n + k for n in lengths], device=device)
            hidden, _ = self.model(tok, positions, caches, step_meta)
            logits = self.model.compute_logits(hidden)
        token_ids = torch.stack(tokens, 1)  # [R, gamma]
        probs = None if all(greedy) else torch.stack(qs, 1)  # [R, gamma, V]
        return DraftOutput(token_ids, probs, None)

    @staticmethod
    def _draw(logits: torch.Tensor, greedy: list[bool], temps: torch.Tensor, generators):
        tokens = logits.argmax(-1)
        if all(greedy):
            return tokens, None
        probs = torch.softmax(logits / temps[:, None], dim=-1)  # [R, V]
        for i, gen in enumerate(generators):
            if not greedy[i]:
                tokens[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        return tokens, probs
