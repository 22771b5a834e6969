"""Per-step sampling metadata: R rows of sampling parameters as tensors, plus host-side row flags.

One row per request (plain sampling) or per verified position (``expand``). Optional tensors are
``None`` when no row uses the feature, so the common case skips the work entirely. Every row also
carries its random stream (``keys``, ``attempts``; ``kernels/keyed_random.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sparkserve.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingMetadata:
    """Batched view of R rows' ``SamplingParams``.

    Attributes:
        temperature: ``[R]`` fp32; 0 for greedy rows.
        top_p: ``[R]`` fp32 in (0, 1] (1 = off), or None.
        top_k: ``[R]`` int64 >= 1 (a value >= the vocabulary = off), or None.
        min_p: ``[R]`` fp32 in [0, 1] (0 = off), or None.
        presence_penalty / frequency_penalty: ``[R]`` fp32, or None (both set or both None).
        output_token_counts: ``[R, V]`` int32 occurrences of each token among the row's generated
            tokens (penalties), or None.
        logit_bias: ``[R, V]`` fp32 dense additive bias, or None.
        keys: ``[R]`` int64 random-stream keys (``keyed_random.request_key``).
        attempts: ``[R]`` int64 verify-step counter mixed into unseeded rows' streams (0 when seeded).
        greedy / seeded: host-side per-row flags (``SamplingParams.greedy``, ``seed is not None``).
        num_logprobs: host-side per-row ``SamplingParams.logprobs``.
    """

    temperature: Tensor
    top_p: Tensor | None
    top_k: Tensor | None
    min_p: Tensor | None
    presence_penalty: Tensor | None
    frequency_penalty: Tensor | None
    output_token_counts: Tensor | None
    logit_bias: Tensor | None
    keys: Tensor
    attempts: Tensor
    greedy: tuple[bool, ...]
    seeded: tuple[bool, ...]
    num_logprobs: tuple[int | None, ...]

    @property
    def num_rows(self) -> int:
        return len(self.greedy)

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        keys: Sequence[int],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        attempts: Sequence[int] | None = None,
    ) -> SamplingMetadata:
        """Gathers R rows' parameters into tensors on ``device``.

        ``output_token_ids[r]`` are row r's generated tokens (read only when a row uses a penalty).
        Raises ValueError for a ``logit_bias`` token outside the vocabulary or mismatched lengths.
        """
        num_rows = len(params)
        if len(keys) != num_rows or len(output_token_ids) != num_rows:
            raise ValueError("params, keys and output_token_ids must have the same length")

        def column(values: list, dtype: torch.dtype, used: bool = True) -> Tensor | None:
            return torch.tensor(values, dtype=dtype, device=device) if used else None

        greedy = tuple(p.greedy for p in params)
        presence = frequency = counts = None
        if any(p.needs_penalties for p in params):
            presence = column([p.presence_penalty for p in params], torch.float32)
            frequency = column([p.frequency_penalty for p in params], torch.float32)
            counts = token_counts(output_token_ids, vocab_size, device)
        seeded = tuple(p.seed is not None for p in params)
        attempts = [0] * num_rows if attempts is None else [0 if s else a for s, a in zip(seeded, attempts, strict=True)]
        return cls(
            temperature=column([0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                               torch.float32),
            top_p=column([p.top_p for p in params], torch.float32, any(p.top_p < 1.0 for p in params)),
            top_k=column([p.top_k or vocab_size for p in params], torch.int64,
                         any(p.top_k is not None and p.top_k < vocab_size for p in params)),
            min_p=column([p.min_p for p in params], torch.float32, any(p.min_p > 0 for p in params)),
            presence_penalty=presence,
            frequency_penalty=frequency,
            output_token_counts=counts,
            logit_bias=dense_logit_bias(params, vocab_size, device) if any(p.logit_bias for p in params) else None,
            keys=column(list(keys), torch.int64),
            attempts=column(list(attempts), torch.int64),
            greedy=greedy,
            seeded=seeded,
            num_logprobs=tuple(p.logprobs for p in params),
        )

    def select(self, rows: Sequence[int]) -> SamplingMetadata:
        """The metadata of a subset of rows (in the given order)."""
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.keys.device)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index)

        return SamplingMetadata(
            temperature=pick(self.temperature), top_p=pick(self.top_p), top_k=pick(self.top_k),
            min_p=pick(self.min_p), presence_penalty=pick(self.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty), output_token_counts=pick(self.output_token_counts),
            logit_bias=pick(self.logit_bias), keys=pick(self.keys), attempts=pick(self.attempts),
            greedy=tuple(self.greedy[r] for r in rows), seeded=tuple(self.seeded[r] for r in rows),
            num_logprobs=tuple(self.num_logprobs[r] for r in rows),
        )

    def expand(self, num_draft_tokens: Sequence[int], draft_token_ids: Tensor | None) -> SamplingMetadata:
        """One row per verified position: row r is repeated ``1 + l_r`` times (ragged, no padding).

        Row ``k`` of request r's block (k = 0 follows the anchor, k = j + 1 follows draft j) describes
        the target distribution after drafts ``0 .. k-1``: its penalty counts include them (the target
        at position k is conditioned on those drafts having been generated).

        Args:
            num_draft_tokens: l_r per row (host list).
            draft_token_ids: ``[sum l_r]`` int64 flat drafts (None when no row has drafts).
        """
        index = [r for r, n in enumerate(num_draft_tokens) for _ in range(1 + n)]  # host: no device read-back
        expanded = self.select(index)
        if self.output_token_counts is None or draft_token_ids is None or not draft_token_ids.numel():
            return expanded
        counts = expanded.output_token_counts.clone()  # [N, V]
        rows, tokens = [], []
        offset, draft = 0, 0
        for n in num_draft_tokens:
            for k in range(1, n + 1):  # row offset + k sees drafts 0 .. k-1
                rows.extend([offset + k] * k)
                tokens.extend(range(draft, draft + k))
            offset += n + 1
            draft += n
        if rows:
            row_t = torch.tensor(rows, device=counts.device)
            tok_t = draft_token_ids[torch.tensor(tokens, device=counts.device)]
            counts.index_put_((row_t, tok_t), torch.ones_like(row_t, dtype=counts.dtype), accumulate=True)
        return replace(expanded, output_token_counts=counts)


def token_counts(output_token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> Tensor:
    """``[R, V]`` int32 occurrence counts of each row's generated tokens."""
    rows = [r for r, ids in enumerate(output_token_ids) for _ in ids]
    toks = [t for ids in output_token_ids for t in ids]
    counts = torch.zeros(len(output_token_ids), vocab_size, dtype=torch.int32, device=device)
    if toks:
        index = (torch.tensor(rows, device=device), torch.tensor(toks, device=device))
        counts.index_put_(index, torch.ones(len(toks), dtype=torch.int32, device=device), accumulate=True)
    return counts


def dense_logit_bias(params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str) -> Tensor:
    """``[R, V]`` fp32 additive bias from each row's ``(token id, bias)`` pairs.
    Raises ValueError for a token id outside the vocabulary."""
    rows, toks, vals = [], [], []
    for r, p in enumerate(params):
        for tok, val in p.logit_bias:
            if not 0 <= tok < vocab_size:
                raise ValueError(f"logit_bias token id {tok} outside the vocabulary [0, {vocab_size})")
            rows.append(r)
            toks.append(tok)
            vals.append(val)
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    if rows:
        bias[torch.tensor(rows, device=device), torch.tensor(toks, device=device)] = torch.tensor(vals, device=device)
    return bias
