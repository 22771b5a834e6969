"""Tiny random targets, random DSpark drafters and the test-only oracle drafter."""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from engine.loader import LoadedModel
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.reference import reference_logits
from engine.spec.dspark import DraftOutput, DSparkDrafter
from engine.spec.dspark_loader import random_drafter_config

EOS = 1


def tiny_target(vocab: int = 61, seed: int = 0, scale: float = 0.35, layers: int = 3) -> LoadedModel:
    """A random fp32 Llama with well-separated logits (weights ~ N(0, scale^2))."""
    config = ModelConfig(
        architecture="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False,
        qk_norm=False, bos_token_id=None, eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.embed_tokens.weight.copy_(torch.randn(model.embed_tokens.weight.shape, generator=gen) * scale)
        if model.lm_head is not None:
            model.lm_head.copy_(torch.randn(model.lm_head.shape, generator=gen) * scale)
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, stop_token_ids=(EOS,), bos_token_id=None)
    return LoadedModel(model, config, tokenizer, "tiny")


def random_dspark(target: LoadedModel, block_size: int = 4, markov_rank: int = 16, confidence: bool = True,
                  seed: int = 1, markov_scale: float = 1.0) -> DSparkDrafter:
    """A randomly initialised DSpark (markov_rank > 0) or DFlash (0) drafter sharing the target's heads."""
    cfg = target.config
    config = random_drafter_config(
        {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
         "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_hidden_layers,
         "rope_theta": cfg.rope_theta},
        target_layer_ids=(0, 1), block_size=block_size, num_layers=1, markov_rank=markov_rank,
        confidence=confidence,
    )
    drafter = DSparkDrafter(config, target.model.embed_tokens.weight, target.model.lm_head_weight)
    drafter.reset_parameters(torch.Generator().manual_seed(seed))
    if markov_rank and markov_scale != 1.0:
        with torch.no_grad():
            for p in drafter.markov_head.parameters():
                p.mul_(markov_scale)
    return drafter


@dataclass(frozen=True)
class _OracleConfig:
    block_size: int
    target_layer_ids: tuple[int, ...] = (0,)
    num_hidden_layers: int = 0
    num_key_value_heads: int = 1
    head_dim: int = 1
    markov_rank: int = 0


class OracleDrafter:
    """Proposes the target's own greedy continuation with one error injected at a random position
    (drawn from its own seeded RNG; position ``gamma`` = no error), so every accept length
    0..gamma happens. q is one-hot at the proposal. Test only."""

    needs_token_history = True

    def __init__(self, target: LoadedModel, block_size: int = 4, seed: int = 0, error_rate: float = 1.0) -> None:
        self.config = _OracleConfig(block_size)
        self.model = target.model
        self.vocab = target.config.vocab_size
        self.rng = torch.Generator().manual_seed(seed)
        self.error_rate = error_rate

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list:
        return []

    def add_context(self, features, positions, slot_mapping, kv_caches) -> None:
        return None

    def _continuation(self, history: list[int], n: int) -> list[int]:
        tokens = list(history)
        for _ in range(n):
            tokens.append(int(torch.argmax(reference_logits(self.model, tokens))))
        return tokens[len(history):]

    def propose(self, anchor_ids, starts, block_tables, block_size, kv_caches, temperatures, generators,
                token_histories) -> DraftOutput:
        gamma = self.config.block_size
        rows = []
        for history in token_histories:
            cont = self._continuation(history, gamma)
            if float(torch.rand((), generator=self.rng)) < self.error_rate:
                pos = int(torch.randint(0, gamma + 1, (), generator=self.rng))
                if pos < gamma:
                    cont[pos] = (cont[pos] + 1) % self.vocab
            rows.append(cont)
        tokens = torch.tensor(rows, dtype=torch.int64)  # [R, gamma]
        q = torch.nn.functional.one_hot(tokens, self.vocab).float()  # [R, gamma, V]
        conf = torch.full(tokens.shape, 0.9)
        return DraftOutput(tokens, q, conf)


class LookupOracleDrafter(OracleDrafter):
    """Oracle for real models: proposes the continuation of a precomputed reference output
    (``references[prompt] = tokens``) found by the request's token history, with the same error
    injection; past the reference (or after a near-tie parting) it proposes token 0 repeatedly."""

    def __init__(self, references: dict[tuple[int, ...], list[int]], vocab: int, block_size: int = 4,
                 seed: int = 0, error_rate: float = 1.0) -> None:
        self.config = _OracleConfig(block_size)
        self.references = references
        self.vocab = vocab
        self.rng = torch.Generator().manual_seed(seed)
        self.error_rate = error_rate

    def _continuation(self, history: list[int], n: int) -> list[int]:
        for prompt, ref in self.references.items():
            k = len(prompt)
            if tuple(history[:k]) == prompt and history[k:] == ref[: len(history) - k]:
                cont = ref[len(history) - k: len(history) - k + n]
                return cont + [0] * (n - len(cont))
        return [0] * n
