"""Policy selection (``--verify-policy none|fixed:K|dspark|dspark-async``), the two simple
policies, and ``plan_verify``, the one entry point the scheduler calls each step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparkserve.scheduler.policy.common import VerifyPlan, VerifyRequest, survival
from sparkserve.scheduler.policy.dspark_planner import verify_dspark, verify_dspark_async
from sparkserve.scheduler.profile.grid import StepTimeModel

POLICY_KINDS = ("none", "fixed", "dspark", "dspark-async")


@dataclass(frozen=True)
class PolicySpec:
    """A parsed verification policy: ``kind`` in POLICY_KINDS; ``k`` (>= 1) only for ``fixed``."""

    kind: str
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown verify policy {self.kind!r}; expected one of {POLICY_KINDS}")
        if (self.kind == "fixed") != (self.k is not None) or (self.k is not None and self.k < 1):
            raise ValueError("a 'fixed' policy needs k >= 1 and the others no k")

    @property
    def needs_profile(self) -> bool:
        return self.kind in ("dspark", "dspark-async")

    def __str__(self) -> str:
        return f"fixed:{self.k}" if self.kind == "fixed" else self.kind


def parse_policy(spec: str) -> PolicySpec:
    """Parse ``none``, ``fixed:K`` (K >= 1 drafts verified per step), ``dspark`` or ``dspark-async``."""
    text = spec.strip().lower()
    if text.startswith("fixed:"):
        value = text.removeprefix("fixed:")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"invalid verify policy {spec!r}: fixed:K needs an integer K >= 1 (use 'none' for 0)"
            )
        return PolicySpec("fixed", int(value))
    if text in ("none", "dspark", "dspark-async"):
        return PolicySpec(text)
    raise ValueError(f"invalid verify policy {spec!r}: expected none, fixed:K, dspark or dspark-async")


def verify_none(reqs: Sequence[VerifyRequest]) -> list[int]:
    """No speculation: every request verifies 0 drafts (and still advances one token)."""
    return [0] * len(reqs)


def verify_fixed(
    reqs: Sequence[VerifyRequest], k: int, prefill_tokens: int = 0, token_budget: int | None = None
) -> list[int]:
    """Fixed-length speculation: ``l_r = min(k, max_verify)``. When ``token_budget`` is given and
    too small, slots are handed out position-major (everyone's first draft, then everyone's
    second, ...), which keeps every l_r a prefix and spreads the shortfall evenly."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    caps = [min(k, req.max_verify) for req in reqs]
    if token_budget is None:
        return caps
    available = token_budget - prefill_tokens - len(reqs)
    if prefill_tokens < 0 or available < 0:
        raise ValueError(f"{prefill_tokens} prefill + {len(reqs)} base tokens do not fit {token_budget}")
    lengths = [0] * len(reqs)
    for position in range(k):
        for r, cap in enumerate(caps):
            if available == 0:
                return lengths
            if position < cap:
                lengths[r] += 1
                available -= 1
    return lengths


def _plan_from_lengths(
    reqs: Sequence[VerifyRequest], lengths: Sequence[int], prefill_tokens: int, profile: StepTimeModel | None
) -> VerifyPlan:
    """Wrap given lengths into a plan; drafts without a confidence count as a = 0 in E."""
    expected = sum(
        1.0 + sum(survival(req.confidences[:length])) for req, length in zip(reqs, lengths, strict=True)
    )
    batch = prefill_tokens + sum(1 + length for length in lengths)
    theta = expected / profile.step_time(batch, len(reqs)) if profile is not None and reqs else None
    return VerifyPlan(tuple(lengths), expected, batch, theta)


def plan_verify(
    policy: PolicySpec,
    reqs: Sequence[VerifyRequest],
    profile: StepTimeModel | None,
    prefill_tokens: int,
    token_budget: int,
    budget_k: int | None = None,
) -> VerifyPlan:
    """Verify lengths for this step's decode requests under ``policy``.

    ``prefill_tokens`` is T, the prefill-chunk tokens already scheduled this step, ``token_budget`` the
    step's whole budget. ``dspark-async`` needs ``budget_k`` from ``plan_budget_k`` on an earlier
    step; without one (the first step) it falls back to ``dspark``, never to a search over the
    current confidences.
    """
    if policy.needs_profile and profile is None:
        raise ValueError(f"verify policy {policy} needs a throughput profile")
    if policy.kind == "none":
        lengths = verify_none(reqs)
    elif policy.kind == "fixed":
        lengths = verify_fixed(reqs, policy.k or 0, prefill_tokens, token_budget)
    elif policy.kind == "dspark-async" and budget_k is not None:
        return verify_dspark_async(reqs, profile, prefill_tokens, token_budget, budget_k)
    else:
        return verify_dspark(reqs, profile, prefill_tokens, token_budget)  # type: ignore[arg-type]
    return _plan_from_lengths(reqs, lengths, prefill_tokens, profile)
