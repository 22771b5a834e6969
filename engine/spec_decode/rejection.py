"""Lossless verification of drafts over one flattened ragged batch (no ``[R, gamma + 1, V]`` padding).

Sources: Leviathan et al. 2023 (Alg. 1) and Chen et al. 2023 (Alg. 2) for rejection sampling; DeepSpec
section 2 step 11 (shared/DEEPSPEC_FORMAT.md) for its constants (``kernels/verify_contract.py``); the Gumbel-max trick for coupling.

Layout: request r verifies l_r drafts ``x_0 .. x_{l_r - 1}`` (flat ``[D]``, D = sum l_r, offsets
``cu_num_draft_tokens``) and has ``1 + l_r`` target rows ``p_0 .. p_{l_r}`` (flat ``[N]``, N = D + R;
``p_j`` is the target after the anchor and ``x_0 .. x_{j-1}``). Every request emits ``a + 1`` tokens:
the a accepted drafts (a leading prefix), then the *recovered* token (after a rejection at a < l_r) or the
*bonus* token (a = l_r).

Two rules, by row kind:
- **agreement** (greedy and Gumbel-coupled rows): the target's own choice ``y_j`` at every row is known
  (greedy: argmax of the adjusted logits; coupled: ``argmax(log p_j + G_j)`` with Gumbel noise keyed by
  the seed and the position). Draft j is accepted iff ``x_j == y_j`` and all before were; the emitted
  tokens are ``y_0 .. y_a``, exactly what the target emits without speculation, whatever was drafted.
- **rejection** (unseeded sampled rows): draft j is accepted iff ``u_j * max(q_j(x_j), 1e-8) < p_j(x_j)``
  (``u_j`` keyed uniform), i.e. with probability ``min(1, p/q)``; after a rejection the recovered token
  is drawn from ``max(p_a - q_a, 0)`` by CDF inversion (no normalisation pass: the inversion scales by the
  total), falling back to ``p_a`` when that mass is below 1e-8; the bonus token is drawn from
  ``p_{l_r}``. A deterministic draft (a suffix match, ``q`` one-hot) has ``q(x) = 1`` and residual
  ``p_a`` without ``x``. So ``P(emit v) = min(p, q)(v) + (1 - sum min(p, q)) residual(v) = p(v)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparkserve.engine.sampling.draw import inverse_cdf
from sparkserve.kernels.verify_contract import Q_FLOOR, RESIDUAL_MIN_MASS, VerifyResult


@dataclass(frozen=True)
class RaggedDrafts:
    """The drafts of R requests, flat.

    Attributes:
        token_ids: ``[D]`` int64 drafts, request after request.
        num_draft_tokens: l_r per request (host).
    """

    token_ids: Tensor
    num_draft_tokens: tuple[int, ...]

    @property
    def num_requests(self) -> int:
        return len(self.num_draft_tokens)

    def index(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(request [D], position j within its block [D], first target row of each request [R])``."""
        device = self.token_ids.device
        counts = torch.tensor(self.num_draft_tokens, dtype=torch.int64, device=device)
        request = torch.repeat_interleave(torch.arange(self.num_requests, device=device), counts,
                                          output_size=self.token_ids.numel())  # [D] (host size: no sync)
        cu = torch.cumsum(counts, 0) - counts  # [R] first draft index
        position = torch.arange(self.token_ids.numel(), device=device) - cu[request]  # [D]
        first_row = cu + torch.arange(self.num_requests, device=device)  # [R] row of p_0
        return request, position, first_row


def _num_accepted(accept: Tensor, drafts: RaggedDrafts, request: Tensor, position: Tensor) -> Tensor:
    """Length of each request's leading run of accepted drafts: ``accept`` ``[D]`` bool -> ``[R]``."""
    limit = torch.tensor(drafts.num_draft_tokens, dtype=torch.int64, device=accept.device)  # [R]
    if accept.numel() == 0:
        return limit
    # accepted drafts contribute their request's limit (a no-op under amin): no boolean indexing, no sync
    first_rejection = torch.where(accept, limit[request], position)  # [D]
    return limit.scatter_reduce(0, request, first_rejection, reduce="amin")


def _assemble(drafts: RaggedDrafts, num_accepted: Tensor, final: Tensor, first_row: Tensor | None = None,
              choices: Tensor | None = None) -> VerifyResult:
    """``[R, 1 + max l]``: drafts (or the target choices) up to a, then ``final`` at a, then 0."""
    width = 1 + max(drafts.num_draft_tokens, default=0)
    device = num_accepted.device
    cols = torch.arange(width, device=device)[None, :]  # [1, W]
    counts = torch.tensor(drafts.num_draft_tokens, dtype=torch.int64, device=device)
    if choices is not None:
        source, base = choices, first_row
    else:
        source, base = drafts.token_ids, torch.cumsum(counts, 0) - counts
    if source.numel():
        index = (base[:, None] + cols).clamp_max(source.numel() - 1)
        tokens = source[index]  # [R, W]
    else:
        tokens = torch.zeros(num_accepted.numel(), width, dtype=torch.int64, device=device)
    tokens = torch.where(cols < num_accepted[:, None], tokens, torch.zeros_like(tokens))
    tokens = torch.where(cols == num_accepted[:, None], final[:, None], tokens)
    return VerifyResult(tokens, num_accepted)


def verify_by_agreement(drafts: RaggedDrafts, target_choice: Tensor) -> VerifyResult:
    """Greedy / coupled rows: accept the leading drafts equal to the target's own choices.

    Args:
        drafts: R requests' drafts.
        target_choice: ``[N]`` int64 the target's token at every verify row (N = D + R).
    """
    request, position, first_row = drafts.index()
    accept = drafts.token_ids == target_choice[first_row[request] + position]  # [D]
    num_accepted = _num_accepted(accept, drafts, request, position)
    final = target_choice[first_row + num_accepted]
    return _assemble(drafts, num_accepted, final, first_row, target_choice)


@dataclass(frozen=True)
class DraftProbs:
    """q of a group's drafts (what rejection sampling divides by).

    Attributes:
        probs: ``[D, V']`` fp32 q rows (V' <= V: the draft vocabulary prefix), or None when every draft
            is deterministic.
        one_hot: ``[D]`` bool, True where the draft was deterministic (its q is one-hot at the draft;
            the ``probs`` row is then unused).
    """

    probs: Tensor | None
    one_hot: Tensor


def verify_by_rejection(drafts: RaggedDrafts, target_probs: Tensor, q: DraftProbs, u_accept: Tensor,
                        u_recover: Tensor, u_bonus: Tensor) -> VerifyResult:
    """Unseeded sampled rows: speculative rejection sampling (module docstring).

    Args:
        drafts: R requests' drafts.
        target_probs: ``[N, V]`` fp32 target distributions p of every verify row (N = D + R).
        q: the drafts' distributions.
        u_accept: ``[D]`` uniforms of the acceptance tests.
        u_recover / u_bonus: ``[R]`` uniforms for the recovered / bonus token of each request.
    """
    request, position, first_row = drafts.index()
    draft_rows = first_row[request] + position  # [D] row of p_j for draft j
    p_x = target_probs[draft_rows, drafts.token_ids] if drafts.token_ids.numel() else target_probs.new_zeros(0)
    q_x = torch.ones_like(p_x)
    if q.probs is not None and p_x.numel():
        vocab_q = q.probs.shape[-1]
        in_vocab = drafts.token_ids < vocab_q
        dense = q.probs.gather(1, drafts.token_ids.clamp_max(vocab_q - 1)[:, None]).squeeze(1)
        q_x = torch.where(q.one_hot, q_x, torch.where(in_vocab, dense, torch.zeros_like(dense)))
    accept = u_accept * q_x.clamp_min(Q_FLOOR) < p_x  # [D]
    num_accepted = _num_accepted(accept, drafts, request, position)
    final_rows = first_row + num_accepted  # [R]
    p_final = target_probs[final_rows]  # [R, V]
    counts = torch.tensor(drafts.num_draft_tokens, dtype=torch.int64, device=p_final.device)
    rejected = num_accepted < counts  # [R]
    weights, uniforms = p_final, u_bonus
    if drafts.token_ids.numel():  # (no host sync: the residual is built for every request)
        cu = torch.cumsum(counts, 0) - counts
        rejected_draft = (cu + num_accepted).clamp_max(drafts.token_ids.numel() - 1)  # [R]
        residual = _residual(p_final, q, drafts.token_ids, rejected_draft)
        use_residual = rejected & (residual.sum(dim=1) > RESIDUAL_MIN_MASS)
        weights = torch.where(use_residual[:, None], residual, p_final)
        uniforms = torch.where(rejected, u_recover, u_bonus)
    final = inverse_cdf(weights, uniforms)
    return _assemble(drafts, num_accepted, final)


def _residual(p: Tensor, q: DraftProbs, draft_ids: Tensor, draft_index: Tensor) -> Tensor:
    """``max(p - q, 0)`` per request at its rejected draft: p ``[R, V]``; q one-hot or ``[V']`` rows."""
    residual = p.clone()
    one_hot = q.one_hot[draft_index]  # [R]
    tokens = draft_ids[draft_index]  # [R]
    if q.probs is not None:
        dense = q.probs[draft_index]  # [R, V']
        vocab_q = dense.shape[-1]
        residual[:, :vocab_q] -= torch.where(one_hot[:, None], torch.zeros_like(dense), dense)
    hot = residual.gather(1, tokens[:, None]) - one_hot[:, None].to(p.dtype)
    residual.scatter_(1, tokens[:, None], hot)
    return residual.clamp_min_(0.0)


def split_rows(flags: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Indices of the True and of the False entries."""
    yes = [i for i, f in enumerate(flags) if f]
    no = [i for i, f in enumerate(flags) if not f]
    return yes, no
