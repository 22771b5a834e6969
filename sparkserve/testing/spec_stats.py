"""Statistical helpers of the distributional losslessness tests: the exact joint distribution of two
generated tokens on a tiny target, its empirical counterpart through an engine, and a chi-square test."""

from __future__ import annotations

import math

import torch

from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.reference import reference_logits


def exact_joint(target, prompt: list[int], temperature: float, allowed=None) -> torch.Tensor:
    """Exact distribution of the (2nd, 3rd) generated tokens: the first verify step's outputs.
    ``allowed(i)`` (``[V]`` bool) restricts output token i (a logits mask), None = no mask."""
    def p(ctx: list[int]) -> torch.Tensor:
        logits = reference_logits(target.model, ctx) / temperature
        if allowed is not None:
            logits = logits.masked_fill(~allowed(len(ctx) - len(prompt)), float("-inf"))
        return torch.softmax(logits, -1)

    p1 = p(prompt)
    vocab = p1.numel()
    joint = torch.zeros(vocab, vocab)
    for x1 in range(vocab):
        p2 = p(prompt + [x1])
        for x2 in range(vocab):
            joint[x2] += p1[x1] * p2[x2] * p(prompt + [x1, x2])
    return joint


def sampled_joint(core, prompt, n: int, temperature: float, vocab: int, seeded: bool = False,
                  steps: list | None = None) -> torch.Tensor:
    """Counts ``[vocab, vocab]`` of the 2nd and 3rd output tokens of ``n`` runs of ``prompt``; ``steps``
    (when given) receives the stats record of every step."""
    params = [SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True, seed=1000 + s if seeded else None)
              for s in range(n)]
    outs = core.generate_batch([prompt] * n, params, steps=steps)
    counts = torch.zeros(vocab, vocab)
    for o in outs:
        counts[o[1], o[2]] += 1
    return counts


def chi2(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    n = counts.sum()
    expected = probs.flatten() * n
    big = expected >= min_expected
    obs_small, exp_small = counts.flatten()[~big].sum(), expected[~big].sum()
    stat = float((((counts.flatten()[big] - expected[big]) ** 2) / expected[big]).sum())
    if exp_small > 0:
        stat += float((obs_small - exp_small) ** 2 / exp_small)
    return stat, int(big.sum())


def chi2_bound(df: int, z: float = 4.26) -> float:
    """Wilson-Hilferty upper quantile (z = 4.26 <-> p ~ 1e-5)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


