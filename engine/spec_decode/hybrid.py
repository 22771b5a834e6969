"""Hybrid drafts: per request and step, the suffix draft or the DSpark draft, by expected accepted length.

Expected accepted drafts of a block with calibrated conditional confidences c_1..c_n is
``E = sum_j prod_{i<=j} c_i`` (DESIGN.md section 1). The suffix drafter runs first (a dictionary lookup
on the host). A request whose suffix draft is *clearly* better than what DSpark is expected to give
(``E_suffix >= (1 + margin) * E_dspark_estimate + min_gain``; the estimate is a running mean of the
request's recent DSpark blocks, else of all requests') takes it without a DSpark forward; a step in which
every request does so runs no DSpark forward at all (counted in ``stats``). The others run DSpark and keep
the better of the two by their actual expectations. Choosing between two proposals before either is
verified changes how much is accepted, never what is emitted (verification is lossless for any draft).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from sparkserve.engine.spec_decode.drafter import DraftBatch, DraftOutput, KVCache
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.suffix import SuffixDrafter

ESTIMATE_RATE = 0.2
"""EWMA rate of the per-request and global DSpark expected-length estimates."""


def expected_accepted(confidences: list[float]) -> float:
    """``sum_j prod_{i<=j} c_i`` of one block's conditional confidences."""
    total, survival = 0.0, 1.0
    for c in confidences:
        survival *= c
        total += survival
    return total


@dataclass
class HybridStats:
    """Counters of the hybrid's choices: steps, steps with no DSpark forward, rows by chosen drafter."""

    num_steps: int = 0
    num_steps_without_dspark: int = 0
    num_dspark_rows: int = 0
    num_suffix_rows: int = 0


@dataclass
class HybridDrafter:
    """Suffix + DSpark drafter (``Drafter`` Protocol; module docstring).

    Args:
        dspark: the DSpark (or DFlash) drafter; its context cache is the hybrid's.
        suffix: the suffix drafter.
        margin / min_gain: how much better the suffix draft must be expected to be to skip DSpark.
    """

    dspark: DSparkDrafter
    suffix: SuffixDrafter
    margin: float = 0.25
    min_gain: float = 0.5
    name: str = "hybrid"
    needs_token_history: bool = True
    stats: HybridStats = field(default_factory=HybridStats)
    _estimate: dict[str, float] = field(default_factory=dict)
    _global_estimate: float | None = None

    @property
    def num_speculative_tokens(self) -> int:
        return max(self.dspark.num_speculative_tokens, self.suffix.num_speculative_tokens)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self.dspark.target_layer_ids

    def context_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return self.dspark.context_bytes_per_block(block_size, dtype)

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[KVCache]:
        return self.dspark.make_kv_caches(num_blocks, block_size, dtype)

    def add_context(self, target_features: Tensor, positions: Tensor, slot_mapping: Tensor,
                    kv_caches: list[KVCache]) -> None:
        self.dspark.add_context(target_features, positions, slot_mapping, kv_caches)

    def release(self, request_id: str) -> None:
        self._estimate.pop(request_id, None)
        self.suffix.release(request_id)

    def propose(self, batch: DraftBatch) -> DraftOutput:
        """Suffix drafts for every row, DSpark drafts for the rows the suffix draft does not clearly win."""
        suffix_out = self.suffix.propose(batch)
        suffix_conf = suffix_out.confidences.tolist() if suffix_out.confidences is not None else None
        lengths = suffix_out.num_tokens or [self.suffix.num_speculative_tokens] * batch.num_rows
        gains = [expected_accepted(suffix_conf[r][: lengths[r]]) if suffix_conf else 0.0 for r in range(batch.num_rows)]
        rids = batch.request_ids or tuple(str(r) for r in range(batch.num_rows))
        run = [r for r in range(batch.num_rows) if not self._suffix_clearly_better(rids[r], gains[r])]
        self.stats.num_steps += 1
        if not run:
            self.stats.num_steps_without_dspark += 1
            self.stats.num_suffix_rows += batch.num_rows
            return replace(suffix_out, drafters=["suffix"] * batch.num_rows)
        dspark_out = self.dspark.propose(_subset(batch, run))
        return self._merge(batch, suffix_out, gains, run, dspark_out, rids)

    def _suffix_clearly_better(self, request_id: str, gain: float) -> bool:
        estimate = self._estimate.get(request_id, self._global_estimate)
        if estimate is None:
            return False  # nothing known about DSpark here yet: run it
        return gain >= (1 + self.margin) * estimate + self.min_gain

    def _observe(self, request_id: str, gain: float) -> None:
        old = self._estimate.get(request_id)
        self._estimate[request_id] = gain if old is None else old + ESTIMATE_RATE * (gain - old)
        g = self._global_estimate
        self._global_estimate = gain if g is None else g + ESTIMATE_RATE * (gain - g)

    def _merge(self, batch: DraftBatch, suffix_out: DraftOutput, gains: list[float], run: list[int],
               dspark_out: DraftOutput, rids: tuple[str, ...]) -> DraftOutput:
        """Per row, the better proposal; q only for rows that keep a freely sampled DSpark draft."""
        gamma = self.num_speculative_tokens
        device = batch.anchor_ids.device
        tokens = torch.zeros(batch.num_rows, gamma, dtype=torch.int64, device=device)
        conf = torch.zeros(batch.num_rows, gamma, dtype=torch.float32, device=device)
        num_tokens = list(suffix_out.num_tokens or [0] * batch.num_rows)
        drafters = ["suffix"] * batch.num_rows
        s_len = self.suffix.num_speculative_tokens
        tokens[:, :s_len] = suffix_out.token_ids
        if suffix_out.confidences is not None:
            conf[:, :s_len] = suffix_out.confidences
        d_len = self.dspark.num_speculative_tokens
        d_conf = dspark_out.confidences.tolist() if dspark_out.confidences is not None else None
        free = set(_free_rows(batch, run))
        q_rows, q_index = [], []
        for i, row in enumerate(run):
            d_gain = expected_accepted(d_conf[i]) if d_conf is not None else 0.0
            self._observe(rids[row], d_gain)
            if d_gain >= gains[row] or num_tokens[row] == 0:
                tokens[row] = 0
                tokens[row, :d_len] = dspark_out.token_ids[i]
                conf[row] = 0
                if dspark_out.confidences is not None:
                    conf[row, :d_len] = dspark_out.confidences[i]
                num_tokens[row] = dspark_out.num_tokens[i] if dspark_out.num_tokens is not None else d_len
                drafters[row] = self.dspark.name
                if row in free:
                    q_rows.append(row)
                    q_index.append(sorted(free).index(row))
        self.stats.num_dspark_rows += sum(d != "suffix" for d in drafters)
        self.stats.num_suffix_rows += sum(d == "suffix" for d in drafters)
        probs = None
        if q_rows and dspark_out.draft_probs is not None:
            probs = dspark_out.draft_probs[torch.tensor(q_index, device=dspark_out.draft_probs.device)]
            if probs.shape[1] < gamma:
                probs = torch.nn.functional.pad(probs, (0, 0, 0, gamma - probs.shape[1]))
        return DraftOutput(tokens, probs, conf, num_tokens, q_rows=q_rows if probs is not None else [], drafters=drafters)


def _subset(batch: DraftBatch, rows: list[int]) -> DraftBatch:
    """The rows ``rows`` of a drafter batch."""
    index = torch.tensor(rows, dtype=torch.int64, device=batch.anchor_ids.device)
    return replace(
        batch, anchor_ids=batch.anchor_ids.index_select(0, index), starts=batch.starts.index_select(0, index),
        block_tables=[batch.block_tables[r] for r in rows], sampling=batch.sampling.select(rows),
        coupled=tuple(batch.coupled[r] for r in rows),
        token_histories=None if batch.token_histories is None else [batch.token_histories[r] for r in rows],
        mask=None if batch.mask is None else (lambda row, prefix, _m=batch.mask: _m(rows[row], prefix)),
        request_ids=tuple(batch.request_ids[r] for r in rows) if batch.request_ids else (),
    )


def _free_rows(batch: DraftBatch, rows: list[int]) -> list[int]:
    """Rows (of the full batch) among ``rows`` that sample freely (their DSpark q is kept)."""
    free = set(batch.free_rows)
    return [r for r in rows if r in free]
