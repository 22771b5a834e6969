"""DESIGN.md section 7 comparison rule for greedy outputs.

Two greedy outputs are "the same" if they are identical, or if the first position where they part is
a near-tie of the reference: its top-2 logit gap is below ``NEAR_TIE_EPS``. A real bug (wrong
position, wrong mask, wrong draft distribution) parts at a clear winner and fails.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparkserve.testing.reference import reference_logits

# fp32 logits of SmolLM2 are O(10-30); batched GEMM vs GEMV rounding moves them by ~1e-4 in fp32,
# so a parting where the reference's top-2 gap exceeds 1e-2 is a bug, not rounding.
NEAR_TIE_EPS = 1e-2


def top2_gap_fn(model, prompt_ids: list[int], reference: list[int]) -> Callable[[int], float]:
    """Gap between the reference's two best logits at generated position ``i`` (one fresh forward)."""

    def gap(i: int) -> float:
        logits = reference_logits(model, list(prompt_ids) + list(reference[:i]))
        top2 = torch.topk(logits, 2).values
        return float(top2[0] - top2[1])

    return gap


def assert_same_or_near_tie(
    output: list[int], reference: list[int], gap_at: Callable[[int], float], eps: float = NEAR_TIE_EPS,
    label: str = "",
) -> bool:
    """Assert DESIGN.md section 7's rule. Returns True when the outputs are identical.

    Raises AssertionError when the outputs part at a position whose reference top-2 gap is >= eps,
    or when they have different lengths without parting (one stopped early).
    """
    for i in range(min(len(output), len(reference))):
        if output[i] != reference[i]:
            gap = gap_at(i)
            assert gap < eps, (
                f"{label}: output parts from the reference at position {i} ({output[i]} vs {reference[i]}) "
                f"where the reference's top-2 logit gap is {gap:.4g} >= {eps}"
            )
            return False
    assert len(output) == len(reference), f"{label}: lengths differ ({len(output)} vs {len(reference)})"
    return True
