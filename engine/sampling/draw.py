"""Drawing tokens from processed logits with keyed randomness (``keyed_random``).

Three row kinds, by the request's ``SamplingParams``:
- greedy rows take ``argmax`` of the adjusted logits (no randomness);
- seeded rows take ``argmax(processed logits + Gumbel noise)`` with noise keyed by (seed, position):
  the Gumbel-max trick samples softmax(processed); because the noise depends on the position only, the
  same seed gives the same token at a position however the step was batched or speculated, and a drafter
  using the same noise proposes the token the target will choose whenever their distributions agree
  (Gumbel-max coupling, ``engine/spec_decode/rejection.py``);
- unseeded rows sample by inversion of the CDF with ONE keyed uniform per row (exact, and far cheaper
  than V random numbers per row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.sampling.transforms import process_logits
from sparkserve.kernels.keyed_random import Draw, keyed_gumbel, keyed_uniform

_NUM_DRAW_KINDS = 8


def stream_draws(meta: SamplingMetadata, kind: Draw) -> Tensor:
    """Per-row draw index of ``kind``: ``kind + 8 * attempt`` (attempt 0 for seeded rows). [N] int64."""
    return meta.attempts * _NUM_DRAW_KINDS + int(kind)


def inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Sample one index per row with probability proportional to ``weights`` (``[N, V]``, >= 0, each
    row with positive mass) by inverting its CDF at ``uniforms`` (``[N]`` in (0, 1)). Returns [N] int64.

    An index of zero weight is never returned: ``searchsorted(right=True)`` lands on the first index
    whose cumulative mass exceeds ``u * total``; when rounding puts ``u * total`` at the total, the row's
    argmax is taken instead (an event of probability ~2^-24).
    """
    cdf = weights.cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:]
    index = torch.searchsorted(cdf, uniforms[:, None] * total, right=True).clamp_max_(weights.shape[-1] - 1)
    chosen = index.squeeze(1)
    bad = weights.gather(1, index).squeeze(1) <= 0
    return torch.where(bad, weights.argmax(dim=-1), chosen)


def coupled_choice(processed: Tensor, keys: Tensor, positions: Tensor) -> Tensor:
    """``argmax(processed + Gumbel(key, position, TOKEN))`` per row: [N, V'] -> [N] int64."""
    noise = keyed_gumbel(keys, positions, int(Draw.TOKEN), processed.shape[-1])
    return (processed + noise).argmax(dim=-1)


def sample(adjusted: Tensor, meta: SamplingMetadata, positions: Tensor, kind: Draw = Draw.TOKEN,
           processed: Tensor | None = None) -> Tensor:
    """One token per row by the row's kind (module docstring).

    Args:
        adjusted: ``[N, V']`` fp32 adjusted logits (``transforms.apply_penalties_and_bias``).
        meta: N rows.
        positions: ``[N]`` int64 sequence position of the token being chosen (keys the noise).
        kind: the stream unseeded rows draw from (``Draw.TOKEN`` for plain / bonus tokens).
        processed: ``process_logits(adjusted, meta)`` if the caller already has it.
    Returns:
        ``[N]`` int64 tokens.
    """
    tokens = adjusted.argmax(dim=-1)
    if meta.all_greedy:
        return tokens
    if processed is None:
        processed = process_logits(adjusted, meta)
    seeded = [not g and s for g, s in zip(meta.greedy, meta.seeded, strict=True)]
    free = [not g and not s for g, s in zip(meta.greedy, meta.seeded, strict=True)]
    if any(seeded):
        rows = torch.tensor([i for i, s in enumerate(seeded) if s], device=adjusted.device)
        tokens[rows] = coupled_choice(processed[rows], meta.keys[rows], positions[rows])
    if any(free):
        rows = torch.tensor([i for i, f in enumerate(free) if f], device=adjusted.device)
        u = keyed_uniform(meta.keys[rows], positions[rows], stream_draws(meta, kind)[rows])
        tokens[rows] = inverse_cdf(torch.softmax(processed[rows], dim=-1), u)
    return tokens
