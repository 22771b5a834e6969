"""How every drafter turns one slot's logits into draft tokens (greedy / coupled / free rows; see
``engine/spec_decode/drafter.py``), with the shared sampling transforms and keyed randomness.

A drafter calls ``SlotSampler.draw`` once per draft slot, left to right (a Markov head or a draft LM
conditions each slot on the previous one). Masks (grammars) are applied before the transforms, so a
draft is never a forbidden token; a row whose allowed tokens all lie outside the draft vocabulary ends its
block at that slot (``num_tokens``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from sparkserve.engine.sampling.draw import coupled_choice, inverse_cdf, stream_draws
from sparkserve.engine.sampling.transforms import apply_penalties_and_bias, process_logits
from sparkserve.engine.spec_decode.drafter import DraftBatch
from sparkserve.kernels.keyed_random import Draw, keyed_uniform


class SlotSampler:
    """Draws the slots of one ``DraftBatch``; collects tokens, q of the free rows and valid lengths.

    Args:
        batch: the drafter batch.
        num_slots: gamma.
        device: where the drafter's logits live.
    """

    def __init__(self, batch: DraftBatch, num_slots: int, device: torch.device) -> None:
        meta = batch.sampling
        self.meta = replace(meta, output_token_counts=None, presence_penalty=None, frequency_penalty=None)
        self.batch = batch
        self.num_slots = num_slots
        self.device = device
        self.greedy_only = meta.all_greedy
        self.coupled_rows = [r for r in range(batch.num_rows) if not meta.greedy[r] and batch.coupled[r]]
        self.free_rows = batch.free_rows
        self.starts = batch.starts.to(device)  # [R]
        self.tokens: list[Tensor] = []  # per slot [R]
        self.probs: list[Tensor] = []  # per slot [F, V']
        self.num_tokens = [num_slots] * batch.num_rows

    def draw(self, logits: Tensor) -> Tensor:
        """Draft tokens of the next slot from its logits ``[R, V']`` fp32 (may be modified in place).
        Returns ``[R]`` int64."""
        slot = len(self.tokens)
        if self.batch.mask is not None:
            self._apply_mask(logits, slot)
        adjusted = apply_penalties_and_bias(logits, self.meta)
        tokens = adjusted.argmax(dim=-1)  # greedy rows
        if not self.greedy_only:
            processed = process_logits(adjusted, self.meta)
            positions = self.starts + slot + 1  # [R] position each row's slot proposes
            if self.coupled_rows:
                rows = torch.tensor(self.coupled_rows, device=self.device)
                tokens[rows] = coupled_choice(processed[rows], self.meta.keys[rows], positions[rows])
            if self.free_rows:
                rows = torch.tensor(self.free_rows, device=self.device)
                q = torch.softmax(processed[rows], dim=-1)  # [F, V']
                u = keyed_uniform(self.meta.keys[rows], positions[rows], stream_draws(self.meta, Draw.DRAFT)[rows])
                tokens[rows] = inverse_cdf(q, u)
                self.probs.append(q)
        self.tokens.append(tokens)
        return tokens

    def _apply_mask(self, logits: Tensor, slot: int) -> None:
        """``-inf`` outside each constrained row's allowed tokens; a row with none left ends here."""
        vocab = logits.shape[-1]
        for row in range(self.batch.num_rows):
            if self.num_tokens[row] < self.num_slots:
                continue  # already cut: the rest of its block is padding
            prefix = [int(t[row]) for t in self.tokens]
            allowed = self.batch.mask(row, prefix)
            if allowed is None:
                continue
            allowed = allowed[:vocab].to(logits.device)
            if not bool(allowed.any()):
                self.num_tokens[row] = slot
                continue
            logits[row].masked_fill_(~allowed, float("-inf"))

    def result(self) -> tuple[Tensor, Tensor | None, list[int] | None]:
        """``(tokens [R, gamma], q [F, gamma, V'] or None, num_tokens or None)``."""
        tokens = torch.stack(self.tokens, dim=1)
        probs = torch.stack(self.probs, dim=1) if self.probs else None
        cut = None if all(n == self.num_slots for n in self.num_tokens) else list(self.num_tokens)
        return tokens, probs, cut
