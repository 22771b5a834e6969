"""Oracle drafters: propose the target's own continuation with injected errors.

Not used when serving. Tests use them to make every accept length 0..gamma happen (bonus path, partial
accepts with KV rollback, stops inside a block, preemption mid-speculation); benchmarks use them to
measure the verify path at controlled acceptance rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.loader import LoadedModel
from engine.reference import reference_logits
from engine.spec.dspark import DraftOutput


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
