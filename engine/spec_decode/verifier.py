"""The verify component: target logits of every verified position in, emitted tokens out.

Plain sampling is the case l_r = 0 for every request (the bonus token is the sampled token), so one
component serves every step. The runner gives it typed inputs (``VerifyInput``) and gets a typed result
(``VerifyOutput``); the rules are in ``engine/spec_decode/rejection.py``:
- greedy rows verify by agreement with the target's argmax;
- seeded rows verify by agreement with the target's Gumbel-max choice under noise keyed by (seed,
  position): the text is the target's seeded sample alone, under load, at any verify length, and with
  speculation off;
- unseeded sampled rows use rejection sampling with the drafts' q (dense or one-hot), with keyed
  uniforms (``--unseeded-coupling`` verifies them by coupling too).
The logits-mask hook (grammars) is applied to every target row before any rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparkserve.engine.sampling.draw import coupled_choice, stream_draws
from sparkserve.engine.sampling.logprobs import token_logprobs
from sparkserve.engine.sampling.mask import LogitsMask
from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.sampling.transforms import apply_penalties_and_bias, process_logits
from sparkserve.engine.spec_decode.rejection import (
    DraftProbs,
    RaggedDrafts,
    VerifyResult,
    verify_by_agreement,
    verify_by_rejection,
)
from sparkserve.kernels.keyed_random import Draw, keyed_uniform
from sparkserve.scheduler.outputs import TokenLogprob


@dataclass(frozen=True)
class VerifyInput:
    """One step's verification of R requests.

    Attributes:
        request_ids: the R requests.
        logits: ``[N, V]`` fp32 target logits of every verify row, request after request (1 + l_r rows).
        drafts: the drafts (``[D]`` flat, l_r per request); all l_r = 0 is plain sampling.
        draft_probs: q of the drafts (rows of unseeded sampled requests), None when all are one-hot.
        sampling: R rows of sampling parameters.
        first_positions: ``[R]`` int64 sequence position of the token chosen at each request's first row.
        output_token_ids: per request, its output tokens so far (the mask hook reads them).
    """

    request_ids: tuple[str, ...]
    logits: Tensor
    drafts: RaggedDrafts
    draft_probs: DraftProbs | None
    sampling: SamplingMetadata
    first_positions: Tensor
    output_token_ids: Sequence[Sequence[int]]


@dataclass(frozen=True)
class VerifyOutput:
    """Emitted tokens of R requests, still on the device (the runner moves them to the host once per
    step, together with the next drafts).

    Attributes:
        token_ids: ``[R, 1 + max l_r]`` int64: accepted drafts, then the recovered or bonus token, then 0.
        num_accepted: ``[R]`` int64 accepted drafts a (row r emits a + 1 tokens).
        adjusted: ``[N, V]`` adjusted logits of every verify row (logprobs are read from them).
        row_offsets: first row of each request in ``adjusted``.
        num_logprobs: per request, ``SamplingParams.logprobs``.
    """

    token_ids: Tensor
    num_accepted: Tensor
    adjusted: Tensor
    row_offsets: tuple[int, ...]
    num_logprobs: tuple[int | None, ...]

    def logprobs(self, request: int, emitted: Sequence[int]) -> list[TokenLogprob] | None:
        """Logprobs of request ``request``'s emitted tokens (host values), None if not asked."""
        k = self.num_logprobs[request]
        if k is None:
            return None
        first = self.row_offsets[request]
        return token_logprobs(self.adjusted[first: first + len(emitted)], emitted, k)


def emitted_tokens(token_ids: Sequence[Sequence[int]], num_accepted: Sequence[int]) -> list[list[int]]:
    """Host lists of each request's emitted tokens from ``VerifyOutput`` moved to the host."""
    return [list(row[: a + 1]) for row, a in zip(token_ids, num_accepted, strict=True)]


class Verifier:
    """Verifies (and samples) one step; stateless apart from its configuration.

    Args:
        mask: the logits-mask hook, or None.
        unseeded_coupling: verify unseeded sampled requests by Gumbel-max coupling too (their drafter
            then couples as well) instead of rejection sampling.
        use_kernels: verify every request in one Triton launch (``sparkserve.engine.spec_decode.verifier_kernels.verify_rows``:
            the same rules and keyed draws, tested equal to the torch groups) instead of the torch groups;
            the runner sets it when the Triton kernels serve its attention (CUDA, or the interpreter in tests).
    """

    def __init__(self, mask: LogitsMask | None = None, unseeded_coupling: bool = False,
                 use_kernels: bool = False) -> None:
        self.mask = mask
        self.unseeded_coupling = unseeded_coupling
        self.use_kernels = use_kernels

    def coupled(self, sampling: SamplingMetadata) -> tuple[bool, ...]:
        """Per row: verified by coupling (seeded, or every sampled row with ``unseeded_coupling``)."""
        return tuple(not g and (s or self.unseeded_coupling) for g, s in zip(sampling.greedy, sampling.seeded, strict=True))

    def verify(self, inp: VerifyInput) -> VerifyOutput:
        """Rules in the module docstring; no host sync (results stay on the device)."""
        drafts, meta = inp.drafts, inp.sampling
        rows_meta = meta.expand(drafts.num_draft_tokens, drafts.token_ids)  # N rows
        adjusted = apply_penalties_and_bias(inp.logits, rows_meta)  # [N, V]
        if self.mask is not None:
            adjusted = self._apply_mask(adjusted, inp)
        coupled = self.coupled(meta)
        row_of = _row_offsets(drafts.num_draft_tokens)
        if self.use_kernels:  # one launch for all requests' drafts (imported here: CPU tests set up Triton first)
            from sparkserve.engine.spec_decode.verifier_kernels import verify_rows

            result = verify_rows(drafts, adjusted, rows_meta, inp.first_positions, inp.draft_probs, coupled)
            return VerifyOutput(result.token_ids, result.num_accepted, adjusted, tuple(row_of), meta.num_logprobs)
        agree = [g or c for g, c in zip(meta.greedy, coupled, strict=True)]
        width = 1 + max(drafts.num_draft_tokens, default=0)
        tokens = torch.zeros(drafts.num_requests, width, dtype=torch.int64, device=inp.logits.device)
        accepted = torch.zeros(drafts.num_requests, dtype=torch.int64, device=inp.logits.device)
        for group, rule in ((_indices(agree, True), self._agreement), (_indices(agree, False), self._rejection)):
            if not group:
                continue
            sub = _subset(inp, rows_meta, adjusted, group, row_of)
            result = rule(*sub, coupled=[coupled[r] for r in group])
            index = torch.tensor(group, device=tokens.device)
            tokens[index, : result.token_ids.shape[1]] = result.token_ids
            accepted[index] = result.num_accepted
        return VerifyOutput(tokens, accepted, adjusted, tuple(row_of), meta.num_logprobs)

    def _agreement(self, drafts: RaggedDrafts, meta: SamplingMetadata, adjusted: Tensor, positions: Tensor,
                   probs: DraftProbs | None, coupled: list[bool]) -> VerifyResult:
        """Greedy rows: argmax; coupled rows: keyed Gumbel-max choice at each row's position."""
        choice = adjusted.argmax(dim=-1)  # [N]
        if any(coupled):
            rows = [i for i, g in enumerate(meta.greedy) if not g]
            index = torch.tensor(rows, device=adjusted.device)
            sub_meta = meta.select(rows)
            choice[index] = coupled_choice(process_logits(adjusted[index], sub_meta), sub_meta.keys, positions[index])
        return verify_by_agreement(drafts, choice)

    def _rejection(self, drafts: RaggedDrafts, meta: SamplingMetadata, adjusted: Tensor, positions: Tensor,
                   probs: DraftProbs | None, coupled: list[bool]) -> VerifyResult:
        """Unseeded sampled rows: rejection sampling with keyed uniforms."""
        target_probs = torch.softmax(process_logits(adjusted, meta), dim=-1)  # [N, V]
        first_list = _row_offsets(drafts.num_draft_tokens)  # host: no read-back
        first_rows = torch.tensor(first_list, device=adjusted.device)
        first_meta = meta.select(first_list)  # one row per request
        keys, first_pos = first_meta.keys, positions[first_rows]
        request, position, _ = drafts.index()
        u_accept = keyed_uniform(keys[request], first_pos[request] + position,
                                 stream_draws(first_meta, Draw.ACCEPT)[request])
        u_recover = keyed_uniform(keys, first_pos, stream_draws(first_meta, Draw.RECOVER))
        u_bonus = keyed_uniform(keys, first_pos, stream_draws(first_meta, Draw.TOKEN))
        q = probs or DraftProbs(None, torch.ones_like(drafts.token_ids, dtype=torch.bool))
        return verify_by_rejection(drafts, target_probs, q, u_accept, u_recover, u_bonus)

    def _apply_mask(self, adjusted: Tensor, inp: VerifyInput) -> Tensor:
        """``-inf`` outside the allowed tokens of constrained requests' rows (after their drafts)."""
        mask = self.mask
        assert mask is not None
        constrained = [r for r, rid in enumerate(inp.request_ids) if mask.constrained(rid)]
        if not constrained:
            return adjusted
        adjusted = adjusted.clone()
        offsets = _row_offsets(inp.drafts.num_draft_tokens)
        draft_offsets = [o - r for r, o in enumerate(offsets)]
        flat = inp.drafts.token_ids.tolist()
        for r in constrained:
            mine = flat[draft_offsets[r]: draft_offsets[r] + inp.drafts.num_draft_tokens[r]]
            for k in range(len(mine) + 1):
                allowed = mask.allowed(inp.request_ids[r], inp.output_token_ids[r], mine[:k])
                adjusted[offsets[r] + k].masked_fill_(~allowed.to(adjusted.device), float("-inf"))
        return adjusted


def _row_offsets(num_draft_tokens: Sequence[int]) -> list[int]:
    """First target row of each request (rows are 1 + l_r per request)."""
    offsets, total = [], 0
    for n in num_draft_tokens:
        offsets.append(total)
        total += 1 + n
    return offsets


def _indices(flags: Sequence[bool], value: bool) -> list[int]:
    return [i for i, f in enumerate(flags) if f == value]


def _subset(inp: VerifyInput, rows_meta: SamplingMetadata, adjusted: Tensor, group: list[int],
            row_of: list[int]) -> tuple[RaggedDrafts, SamplingMetadata, Tensor, Tensor, DraftProbs | None]:
    """The drafts, row metadata, adjusted logits, row positions and q of a group of requests."""
    counts = inp.drafts.num_draft_tokens
    device = adjusted.device
    rows = [row_of[r] + k for r in group for k in range(1 + counts[r])]
    draft_offsets = [o - r for r, o in enumerate(row_of)]
    draft_idx = [draft_offsets[r] + k for r in group for k in range(counts[r])]
    row_t = torch.tensor(rows, device=device)
    draft_t = torch.tensor(draft_idx, dtype=torch.int64, device=device)
    drafts = RaggedDrafts(inp.drafts.token_ids[draft_t], tuple(counts[r] for r in group))
    sizes = torch.tensor([1 + counts[r] for r in group], device=device)  # rows per request
    owner = torch.repeat_interleave(torch.arange(len(group), device=device), sizes,
                                    output_size=len(rows))  # [n] request of each row (host size: no sync)
    first = torch.cumsum(sizes, 0) - sizes
    positions = inp.first_positions[torch.tensor(group, device=device)][owner] + torch.arange(len(rows), device=device) - first[owner]
    probs = None
    if inp.draft_probs is not None and draft_idx:
        dense = None if inp.draft_probs.probs is None else inp.draft_probs.probs[draft_t]
        probs = DraftProbs(dense, inp.draft_probs.one_hot[draft_t])
    sub_adjusted = adjusted if len(rows) == adjusted.shape[0] else adjusted[row_t]
    return drafts, rows_meta.select(rows), sub_adjusted, positions, probs
