"""Oracle drafters (tests and benchmarks only): propose the target's own continuation with injected errors.

Tests use them to make every accept length 0..gamma happen (bonus path, partial accepts with KV
rollback, stops inside a block, preemption mid-speculation); benchmarks use them to measure the verify
path at controlled acceptance rates. Their drafts are deterministic: q is one-hot at the proposal
(returned as dense one-hot rows for freely sampled requests).
"""

from __future__ import annotations

import torch

from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.spec_decode.drafter import DraftBatch, DraftOutput, TokenDrafter
from sparkserve.testing.reference import reference_logits


class OracleDrafter(TokenDrafter):
    """Proposes the target's own greedy continuation with one error injected at a random position
    (drawn from its own seeded RNG; position ``gamma`` = no error), so every accept length 0..gamma
    happens. Implements the ``Drafter`` Protocol; q is one-hot at the proposal."""

    name = "oracle"

    def __init__(self, target: LoadedModel, block_size: int = 4, seed: int = 0, error_rate: float = 1.0) -> None:
        self.num_speculative_tokens = block_size
        self.model = target.model
        self.vocab = target.config.vocab_size
        self.rng = torch.Generator().manual_seed(seed)
        self.error_rate = error_rate

    def _continuation(self, history: list[int], n: int) -> list[int]:
        tokens = list(history)
        for _ in range(n):
            tokens.append(int(torch.argmax(reference_logits(self.model, tokens))))
        return tokens[len(history):]

    def propose(self, batch: DraftBatch) -> DraftOutput:
        """Greedy continuation of each history with the injected error. Its q is one-hot at the draft
        for every row (free rows get that one-hot q, so rejection sampling divides by q(x) = 1)."""
        assert batch.token_histories is not None
        gamma = self.num_speculative_tokens
        rows = []
        for history in batch.token_histories:
            cont = self._continuation(history, gamma)
            if float(torch.rand((), generator=self.rng)) < self.error_rate:
                pos = int(torch.randint(0, gamma + 1, (), generator=self.rng))
                if pos < gamma:
                    cont[pos] = (cont[pos] + 1) % self.vocab
            rows.append(cont)
        tokens = torch.tensor(rows, dtype=torch.int64)  # [R, gamma]
        free = batch.free_rows
        q = torch.nn.functional.one_hot(tokens[free], self.vocab).float() if free else None  # [F, gamma, V]
        return DraftOutput(tokens, q, torch.full(tokens.shape, 0.9))


class LookupOracleDrafter(OracleDrafter):
    """Oracle for real models: proposes the continuation of a precomputed reference output
    (``references[prompt] = tokens``) found by the request's token history, with the same error
    injection; past the reference (or after a near-tie parting) it proposes token 0 repeatedly."""

    def __init__(self, references: dict[tuple[int, ...], list[int]], vocab: int, block_size: int = 4,
                 seed: int = 0, error_rate: float = 1.0) -> None:
        self.num_speculative_tokens = block_size
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
