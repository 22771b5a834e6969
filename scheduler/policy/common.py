"""Shared types and pure helpers of the verification policies.

Terms (DESIGN.md section 1): a request's drafter proposes gamma draft tokens d_1..d_gamma with
confidences c_j = P(d_j accepted | d_1..d_{j-1} accepted), the *conditional survival*. The
*survival* of slot j is ``a_j = prod_{i<=j} c_i``, the probability that the first j drafts are all
accepted. Verifying l_r drafts (the *verify length*) costs ``1 + l_r`` batch tokens and emits
``1 + sum_{j<=l_r} a_j`` tokens in expectation (accepted drafts + the recovered or bonus token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SLO_MAX_WEIGHT = 16.0  # cap of the SLO weight (see slo_weight)
SLO_HEADROOM = 0.95  # the SLO weight steers towards this fraction of the TPOT goal


def survival(confidences: Sequence[float]) -> list[float]:
    """Prefix survival ``a_j = prod_{i<=j} c_i`` (DSpark paper, Algorithm 1), in fp32 semantics.

    The cumulative product is taken in float32 (numpy cumprod), matching the confidence head's
    dtype: every fp32 product with a factor <= 1 rounds to a value <= the previous one, so a_j is
    non-increasing even when saturated sigmoids give c = 0.99999994 or 1.0 (ties then go to the
    shallower slot by the policies' tie-break). Returns Python floats.
    """
    if len(confidences) == 0:
        return []
    c = np.asarray(confidences, dtype=np.float32)  # [gamma]
    if not np.all((c >= 0) & (c <= 1)):  # also rejects NaN
        raise ValueError(f"confidences must lie in [0, 1], got {list(confidences)}")
    return [float(a) for a in np.cumprod(c, dtype=np.float32)]


def slo_weight(target_tpot_s: float | None, decode_time_s: float, num_decode_tokens: int) -> float:
    """Weight w_r >= 1 on a request's expected tokens in the objective (per-request TPOT goal).

    ``behind = decode_time_s / (SLO_HEADROOM * target_tpot_s) - num_decode_tokens`` is how many
    tokens the request is behind the schedule its goal sets (TPOT = decode time / tokens after the
    first; the 5% headroom keeps the cumulative TPOT under the goal, not hovering on it). The weight
    is ``1 + max(0, behind)``, capped at ``SLO_MAX_WEIGHT``: a request on schedule competes like
    any other; one that falls behind gets its slots ranked higher and their gain valued w times
    more, until it catches up (an integral controller on the cumulative TPOT). It depends only on
    the past (time and tokens before this step), never on this step's drafts, so the policy stays
    non-anticipating and lossless.
    """
    if target_tpot_s is None:
        return 1.0
    behind = decode_time_s / (SLO_HEADROOM * target_tpot_s) - num_decode_tokens
    return min(SLO_MAX_WEIGHT, 1.0 + max(0.0, behind))


@dataclass(frozen=True)
class VerifyRequest:
    """One running decode request as the verification policy sees it.

    Attributes:
        confidences: c_j, calibrated conditional survival per draft position (fp32 values); may be
            empty (no drafter, or one without a confidence head).
        max_verify: cap on l_r, already including the drafted length, the remaining output budget
            and the room to max_model_len (``sparkserve.scheduler.request_rules.draft_cap``).
        target_tpot_s: optional per-request time-per-output-token goal (seconds).
        decode_time_s: seconds since the request's first output token, measured before this step.
        num_decode_tokens: output tokens after the first one, before this step.
    """

    confidences: tuple[float, ...]
    max_verify: int
    target_tpot_s: float | None = None
    decode_time_s: float = 0.0
    num_decode_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_verify < 0:
            raise ValueError(f"max_verify must be >= 0, got {self.max_verify}")
        if self.target_tpot_s is not None and not (
            math.isfinite(self.target_tpot_s) and self.target_tpot_s > 0
        ):
            raise ValueError(f"target_tpot_s must be > 0 seconds, got {self.target_tpot_s}")
        if self.decode_time_s < 0 or self.num_decode_tokens < 0:
            raise ValueError("decode_time_s and num_decode_tokens must be >= 0")

    @property
    def slo_weight(self) -> float:
        return slo_weight(self.target_tpot_s, self.decode_time_s, self.num_decode_tokens)


@dataclass(frozen=True)
class VerifyPlan:
    """The verify lengths chosen for one step.

    Attributes:
        lengths: l_r per request (same order as the input), drafts to verify.
        expected_tokens: E = sum_r (1 + sum_{j<=l_r} a_{r,j}), expected emitted tokens (unweighted;
            0 surviving drafts assumed for requests without confidences).
        batch_tokens: B = prefill tokens + sum_r (1 + l_r), every token of the step.
        theta: E * SPS(B, R), expected tokens per second (None when no profile was given).
    """

    lengths: tuple[int, ...]
    expected_tokens: float
    batch_tokens: int
    theta: float | None

    @property
    def num_verify_tokens(self) -> int:
        """Verify slots of the step, sum_r l_r (the budget K of dspark-async)."""
        return sum(self.lengths)
