"""Verification policies: how many drafts each decode request verifies per step.

- ``common``: ``VerifyRequest``, ``VerifyPlan``, ``survival``, ``slo_weight``.
- ``dspark_planner``: ``verify_dspark`` (Algorithm 1, early stop), ``plan_budget_k`` and
  ``verify_dspark_async`` (the production top-K variant).
- ``spec``: ``parse_policy``, ``verify_none``, ``verify_fixed`` and ``plan_verify`` (dispatch).
"""

from sparkserve.scheduler.policy.common import (
    SLO_MAX_WEIGHT,
    VerifyPlan,
    VerifyRequest,
    slo_weight,
    survival,
)
from sparkserve.scheduler.policy.dspark_planner import (
    Slot,
    plan_budget_k,
    plan_drafting,
    ranked_slots,
    verify_dspark,
    verify_dspark_async,
)
from sparkserve.scheduler.policy.spec import (
    POLICY_KINDS,
    PolicySpec,
    parse_policy,
    plan_verify,
    verify_fixed,
    verify_none,
)

__all__ = [
    "POLICY_KINDS",
    "SLO_MAX_WEIGHT",
    "PolicySpec",
    "Slot",
    "VerifyPlan",
    "VerifyRequest",
    "parse_policy",
    "plan_budget_k",
    "plan_drafting",
    "plan_verify",
    "ranked_slots",
    "slo_weight",
    "survival",
    "verify_dspark",
    "verify_dspark_async",
    "verify_fixed",
    "verify_none",
]
