"""Lossless verification of draft tokens (speculative rejection sampling).

Sources: Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding" (Alg. 1);
Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling" (Alg. 2);
DeepSpec section 2 step 11 (shared/DEEPSPEC_FORMAT.md), whose constants this module follows.

Terms, for one request r with l_r drafts ``x_0 .. x_{l_r-1}`` drafted from distributions ``q_i``
and target distributions ``p_0 .. p_{l_r}`` (``p_i`` = target at the position after the anchor and
``x_0 .. x_{i-1}``):

* accepted token: draft ``x_i`` kept because ``x_0 .. x_{i-1}`` were kept and
  ``u_i < min(1, p_i(x_i) / max(q_i(x_i), 1e-8))``, ``u_i ~ U[0, 1)`` (greedy rows: ``x_i`` equals
  the target's argmax). a = number of accepted tokens (the all-accepted prefix).
* recovered token: when draft a is rejected (a < l_r), the token emitted in its place, sampled from the
  residual ``normalize(max(p_a - q_a, 0))`` (greedy rows: the target's argmax at position a).
* bonus token: when all l_r drafts are accepted, one more token sampled from ``p_{l_r}``
  (greedy rows: the argmax at position l_r). ``l_r = 0`` is plain decoding: the bonus token is the
  one token of the step.

Every verify step therefore emits ``a + 1`` tokens, and the emitted sequence has exactly the target's
distribution (the residual makes ``P(emit v) = min(p, q)(v) + (1 - sum min(p, q)) * residual(v) = p(v)``).
The residual has (near) zero mass only when ``p_a <= q_a`` everywhere, i.e. ``p_a = q_a``: then every
draft with ``q_a(x) > 0`` is accepted and rejection can only come from rounding, or from a draft the
stated q gave zero mass (a q that is not the one the drafts were sampled from, e.g. a bf16 sampler);
the fallback to ``p_a`` keeps such a step a valid target sample.

Both the recovered and the bonus token are drawn by an exponential race over one ``[V]`` Exp(1) draw
per row (see ``engine/sampler.py``), so each row draws ``gamma`` uniforms then V exponentials: from its
own generator when it has one (reproducible per request for a given padded width gamma), otherwise from
one batched draw of the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_Q_FLOOR = 1e-8  # DeepSpec: p / max(q, 1e-8)
_RESIDUAL_MIN_MASS = 1e-8  # DeepSpec: fall back to p_a below this residual mass
_EXP_FLOOR = 1e-20


@dataclass(frozen=True)
class RejectionOutput:
    """Result of verifying one step's drafts.

    Attributes:
        output_token_ids: ``[R, gamma + 1]`` int64: the a accepted drafts, then the recovered or bonus
            token, then padding (token 0; ``num_emitted`` says how many entries are real).
        num_emitted: ``[R]`` int64, ``num_accepted + 1``.
        num_accepted: ``[R]`` int64, a (accepted drafts).
    """

    output_token_ids: Tensor
    num_emitted: Tensor
    num_accepted: Tensor


def _residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """Unnormalised recovery distribution ``max(p - q, 0)``; ``p, q``: ``[R, V]``."""
    return (p - q).clamp_min(0.0)


def _draw_randoms(
    num_rows: int, gamma: int, vocab: int, generators: list[torch.Generator | None], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Uniforms ``[R, gamma]`` and Exp(1) draws ``[R, V]``; seeded rows draw from their generator."""
    uniforms = torch.rand(num_rows, gamma, device=device)
    expo = torch.empty(num_rows, vocab, device=device).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            uniforms[row] = torch.rand(gamma, generator=gen, device=device)
            expo[row].exponential_(generator=gen)
    return uniforms, expo.clamp_min_(_EXP_FLOOR)


def rejection_sample(
    draft_token_ids: Tensor,
    num_draft: Tensor,
    draft_probs: Tensor | None,
    target_probs: Tensor | None,
    target_argmax: Tensor,
    is_greedy: Tensor,
    generators: list[torch.Generator | None],
) -> RejectionOutput:
    """Verifies R requests' drafts at once (vectorised over rows and positions).

    Args:
        draft_token_ids: ``[R, gamma]`` int64 drafts; row r's first ``num_draft[r]`` are real, the rest
            padding (any valid token id).
        num_draft: ``[R]`` int64 drafts to verify per row, l_r in [0, gamma].
        draft_probs: ``[R, gamma, V]`` fp32 distributions q the drafts were sampled from. None means the
            drafts were chosen deterministically (one-hot q: accept with probability ``p(x)``), which is
            also right for greedy rows.
        target_probs: ``[R, gamma + 1, V]`` fp32 target distributions p (``processed_probs`` over
            ``SamplingMetadata.expand_for_verify``). None only when every row is greedy (skips all
            random work without a host sync).
        target_argmax: ``[R, gamma + 1]`` int64 argmax of the adjusted target logits (greedy rows).
        is_greedy: ``[R]`` bool.
        generators: per row, a seeded generator or None (global RNG).
    Returns:
        ``RejectionOutput``; emitted tokens of row r are ``output_token_ids[r, :num_emitted[r]]``.
    """
    num_rows, gamma = draft_token_ids.shape
    device = draft_token_ids.device
    assert target_argmax.shape == (num_rows, gamma + 1), target_argmax.shape
    rows = torch.arange(num_rows, device=device)
    positions = torch.arange(gamma + 1, device=device)  # [gamma + 1]
    valid = positions[:gamma].unsqueeze(0) < num_draft.unsqueeze(1)  # [R, gamma] real drafts
    accept = draft_token_ids == target_argmax[:, :gamma]  # [R, gamma] greedy rule

    if target_probs is not None:
        assert target_probs.shape[:2] == (num_rows, gamma + 1), target_probs.shape
        vocab = target_probs.shape[-1]
        uniforms, expo = _draw_randoms(num_rows, gamma, vocab, generators, device)
        p_draft = target_probs[:, :gamma].gather(2, draft_token_ids.unsqueeze(2)).squeeze(2)  # [R, gamma]
        if draft_probs is None:
            q_draft = torch.ones_like(p_draft)
        else:
            q_draft = draft_probs.gather(2, draft_token_ids.unsqueeze(2)).squeeze(2)  # [R, gamma]
        ratio = (p_draft / q_draft.clamp_min(_Q_FLOOR)).clamp_max(1.0)
        accept = torch.where(is_greedy.unsqueeze(1), accept, uniforms < ratio)

    # a = length of the all-accepted prefix among the real drafts
    num_accepted = (accept & valid).to(torch.int64).cumprod(dim=1).sum(dim=1)  # [R]
    final_token = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)  # [R] greedy rows
    if target_probs is not None:
        sampled = _sample_final_token(
            draft_token_ids, num_draft, num_accepted, draft_probs, target_probs, expo, rows
        )
        final_token = torch.where(is_greedy, final_token, sampled)

    padded = torch.cat([draft_token_ids, draft_token_ids.new_zeros(num_rows, 1)], dim=1)  # [R, gamma+1]
    a = num_accepted.unsqueeze(1)
    output = torch.where(positions < a, padded, torch.zeros_like(padded))
    output = torch.where(positions == a, final_token.unsqueeze(1), output)
    return RejectionOutput(output_token_ids=output, num_emitted=num_accepted + 1, num_accepted=num_accepted)


def _sample_final_token(
    draft_token_ids: Tensor,
    num_draft: Tensor,
    num_accepted: Tensor,
    draft_probs: Tensor | None,
    target_probs: Tensor,
    expo: Tensor,
    rows: Tensor,
) -> Tensor:
    """Recovered token (residual at position a) or bonus token (``p_{l_r}``) per random row.

    Args:
        num_accepted: ``[R]`` a; row r rejected draft a iff ``a < num_draft[r]``.
        expo: ``[R, V]`` Exp(1) draws for the race.
        rows: ``[R]`` ``arange(R)``.
    Returns:
        ``[R]`` int64.
    """
    gamma = draft_token_ids.shape[1]
    p_a = target_probs[rows, num_accepted]  # [R, V]
    dist = p_a
    if gamma > 0:
        rejected = num_accepted < num_draft  # [R]
        q_pos = num_accepted.clamp_max(gamma - 1)
        if draft_probs is None:  # deterministic drafts: q_a is one-hot at the rejected draft
            q_a = torch.zeros_like(p_a).scatter_(1, draft_token_ids[rows, q_pos].unsqueeze(1), 1.0)
        else:
            q_a = draft_probs[rows, q_pos]  # [R, V]
        residual = _residual_distribution(p_a, q_a)
        use_residual = rejected & (residual.sum(dim=1) > _RESIDUAL_MIN_MASS)  # [R]
        dist = torch.where(use_residual.unsqueeze(1), residual, p_a)
    return (dist / expo).argmax(dim=1)
