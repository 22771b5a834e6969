"""The verify component's rules with the kernels: target choices, then ONE verification launch.

``engine/spec_decode/verifier.py`` verifies each group of requests (agreement / rejection) with torch
ops; ``verify_rows`` computes the same inputs (the target's greedy argmax, the fused Gumbel-max coupled
choice for coupled rows, ``softmax(process_logits)`` for unseeded sampled rows, each request's key,
first position and attempt) and verifies every request in one ``rejection_sample`` launch. ``Verifier.verify``
calls it after the penalties, bias and logits mask (``adjusted``) when ``Verifier.use_kernels`` is set: the
runner sets it when the Triton kernels serve attention (``attention_backend`` triton / auto on CUDA).
``rejection_sample_reference`` runs the torch rules on the kernel's flat input: the kernel's reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.sampling.transforms import process_logits
from sparkserve.engine.spec_decode.rejection import (
    DraftProbs,
    RaggedDrafts,
    verify_by_agreement,
    verify_by_rejection,
)
from sparkserve.kernels.coupling import coupled_choice
from sparkserve.kernels.keyed_random import _NUM_DRAW_KINDS, Draw, keyed_uniform
from sparkserve.kernels.rejection import FlatVerifyInput, rejection_sample
from sparkserve.kernels.verify_contract import VerifyResult


def verify_rows(drafts: RaggedDrafts, adjusted: Tensor, rows_meta: SamplingMetadata, first_positions: Tensor,
                draft_probs: DraftProbs | None, coupled: Sequence[bool]) -> VerifyResult:
    """Verify R requests (the ``Verifier`` rules, one kernel launch).

    Args:
        drafts: the drafts (``[D]`` flat, l_r per request).
        adjusted: ``[N, V]`` fp32 adjusted logits of every verify row (penalties, bias, mask applied).
        rows_meta: the N rows' sampling metadata (``SamplingMetadata.expand``).
        first_positions: ``[R]`` int64 position of the token chosen at each request's first row.
        draft_probs: q of the drafts, None when all are one-hot.
        coupled: per request, verified by Gumbel-max coupling (``Verifier.coupled``).
    Returns:
        ``VerifyResult`` on ``adjusted``'s device.
    """
    device = adjusted.device
    cu = torch.zeros(drafts.num_requests + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(drafts.num_draft_tokens, dtype=torch.int32), 0)
    row_of = [int(c) + r for r, c in enumerate(cu[:-1].tolist())]  # first row of each request
    greedy = [rows_meta.greedy[row] for row in row_of]
    agree = [g or c for g, c in zip(greedy, coupled, strict=True)]
    positions = _row_positions(drafts, first_positions)  # [N]

    def rows_where(flags: list[bool]) -> list[int]:
        return [row_of[r] + k for r, f in enumerate(flags) if f for k in range(1 + drafts.num_draft_tokens[r])]

    choice = adjusted.argmax(dim=-1)  # [N] greedy rows' choice
    coupled_rows = rows_where([c and not g for c, g in zip(coupled, greedy, strict=True)])
    if coupled_rows:
        index = torch.tensor(coupled_rows, device=device)
        sub = rows_meta.select(coupled_rows)
        choice[index] = coupled_choice(process_logits(adjusted[index], sub), sub.keys, positions[index])
    sampled_rows = rows_where([not a for a in agree])
    probs = None
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=device)
        probs = torch.empty_like(adjusted)  # agreement rows are never read
        probs[index] = torch.softmax(process_logits(adjusted[index], rows_meta.select(sampled_rows)), dim=-1)
    firsts = torch.tensor(row_of, dtype=torch.int64, device=device)
    return rejection_sample(FlatVerifyInput(
        draft_token_ids=drafts.token_ids, cu_num_draft_tokens=cu.to(device),
        max_num_draft_tokens=max(drafts.num_draft_tokens, default=0),
        agreement=torch.tensor(agree, dtype=torch.bool, device=device), target_choice=choice, target_probs=probs,
        draft_probs=None if draft_probs is None else draft_probs.probs,
        draft_one_hot=torch.ones(drafts.token_ids.shape, dtype=torch.bool, device=device) if draft_probs is None
        else draft_probs.one_hot,
        keys=rows_meta.keys[firsts], first_positions=first_positions, attempts=rows_meta.attempts[firsts],
    ))


def _row_positions(drafts: RaggedDrafts, first_positions: Tensor) -> Tensor:
    """``[N]`` int64 sequence position of the token chosen at every verify row (on the device, no sync)."""
    device = first_positions.device
    sizes = torch.tensor([1 + n for n in drafts.num_draft_tokens], dtype=torch.int64, device=device)
    owner = torch.repeat_interleave(torch.arange(drafts.num_requests, device=device), sizes,
                                    output_size=drafts.num_requests + sum(drafts.num_draft_tokens))  # [N], no sync
    first = torch.cumsum(sizes, 0) - sizes
    return first_positions[owner] + torch.arange(owner.numel(), device=device) - first[owner]


def rejection_sample_reference(inp: FlatVerifyInput) -> VerifyResult:
    """The torch rules (``verify_by_agreement`` / ``verify_by_rejection``) on the two groups, with the
    uniforms the verifier draws (``engine/spec_decode/verifier.py``). Host loops: a reference."""
    cu = inp.cu_num_draft_tokens.tolist()
    counts = [cu[r + 1] - cu[r] for r in range(inp.num_requests)]
    width = 1 + inp.max_num_draft_tokens
    device = inp.draft_token_ids.device
    tokens = torch.zeros(inp.num_requests, width, dtype=torch.int64, device=device)
    accepted = torch.zeros(inp.num_requests, dtype=torch.int64, device=device)
    agree = inp.agreement.tolist()
    for flag in (True, False):
        group = [r for r in range(inp.num_requests) if agree[r] == flag]
        if not group:
            continue
        drafts_idx = torch.tensor([d for r in group for d in range(cu[r], cu[r + 1])], dtype=torch.int64, device=device)
        rows = torch.tensor([cu[r] + r + k for r in group for k in range(1 + counts[r])], dtype=torch.int64, device=device)
        drafts = RaggedDrafts(inp.draft_token_ids[drafts_idx], tuple(counts[r] for r in group))
        if flag:
            result = verify_by_agreement(drafts, inp.target_choice[rows])
        else:
            result = _reference_rejection(inp, drafts, drafts_idx, rows, torch.tensor(group, device=device))
        index = torch.tensor(group, device=device)
        tokens[index, : result.token_ids.shape[1]] = result.token_ids
        accepted[index] = result.num_accepted
    return VerifyResult(tokens, accepted)


def _reference_rejection(inp: FlatVerifyInput, drafts: RaggedDrafts, drafts_idx: Tensor, rows: Tensor,
                         group: Tensor) -> VerifyResult:
    """``verify_by_rejection`` on one group, uniforms keyed as ``Verifier._rejection`` keys them."""
    request, position, _ = drafts.index()
    keys, first_pos = inp.keys[group], inp.first_positions[group]
    base = inp.attempts[group] * _NUM_DRAW_KINDS  # draw index = kind + 8 * attempt (stream_draws)
    u_accept = keyed_uniform(keys[request], first_pos[request] + position, (base + int(Draw.ACCEPT))[request])
    u_recover = keyed_uniform(keys, first_pos, base + int(Draw.RECOVER))
    u_bonus = keyed_uniform(keys, first_pos, base + int(Draw.TOKEN))
    dense = None if inp.draft_probs is None else inp.draft_probs[drafts_idx]
    q = DraftProbs(dense, inp.draft_one_hot[drafts_idx])
    return verify_by_rejection(drafts, inp.target_probs[rows], q, u_accept, u_recover, u_bonus)
