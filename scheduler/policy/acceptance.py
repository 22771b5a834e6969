"""Per-request acceptance: good drafts earn their verification fast, losing ones lose it (issue 25).

The calibration table (``calibration.py``) corrects confidences per drafter and temperature class, and it
is conservative until it has data: its prior under-predicts, its fits are lowered by their uncertainty,
and it refits every 50 observations. Where one request's drafts are much better than the table says
(summarization, RAG: the text is copied from the prompt), the planner then never verifies them, so no
outcome ever arrives to correct it. Two remedies, both over already-verified outcomes only (the policy
stays non-anticipating: lossless for any verify length):

- **a per-request ratio**: for request r, over every reached draft position k of its verify steps
  (positions 1 .. min(a + 1, l), outcome ``y = [a >= k]``, as in ``calibration.py``), the ratio of accepted
  drafts to the table's corrected prediction p, with ``prior_weight`` pseudo-positions at ratio 1 (the
  table is the prior): ``rho = (sum y + w) / (sum p + w)``, lowered by ``z`` standard errors
  ``sqrt(sum p (1 - p) + w / 4) / (sum p + w)`` (the binomial variance of the outcomes under the
  prediction). The request's confidences are the table's times ``rho``, capped at ``MAX_CONFIDENCE``; a
  request doing worse than predicted gets ``rho < 1`` just as fast;
- **a probe**: while a request is *probing* (fewer than ``probe_positions`` reached positions observed,
  in at most ``max_probes`` verify steps), it verifies at least ``probe_drafts`` of its drafts whatever
  the plan says (the drafter has run already, so this costs only the verify rows), and the drafting
  gate lets it draft where drafting would pay with the drafter's own stated confidences (the controller's
  ``select_drafting``): where it could not pay even then, as at high load, nobody probes.

The guard (``guard.py``) stays the safety net: if probes and ratios still lose, it backs off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_CONFIDENCE = 0.99
"""Cap of a corrected conditional confidence (a ratio above 1 never claims certainty)."""


@dataclass
class _RequestOutcomes:
    """Sums over a request's reached draft positions: outcomes, predictions and their variance."""

    accepted: float = 0.0
    predicted: float = 0.0
    variance: float = 0.0
    positions: int = 0
    steps: int = 0


@dataclass
class RequestAcceptance:
    """Per-request acceptance ratio and probing (module docstring).

    Attributes:
        prior_weight: pseudo-positions at ratio 1 (w).
        uncertainty_z: standard errors taken off the ratio (z).
        probe_drafts: drafts a probe verifies.
        probe_positions: a request is probed until this many reached positions are observed ...
        max_probes: ... or this many of its verify steps.
    """

    prior_weight: float = 2.0
    uncertainty_z: float = 0.5
    probe_drafts: int = 2
    probe_positions: int = 4
    max_probes: int = 2
    _outcomes: dict[str, _RequestOutcomes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prior_weight <= 0 or min(self.uncertainty_z, self.probe_drafts, self.probe_positions, self.max_probes) < 0:
            raise ValueError("prior_weight must be > 0; uncertainty_z, probe_drafts, probe_positions, max_probes >= 0")

    def ratio(self, request_id: str) -> float:
        """rho of a request (1.0 before any outcome), lower bound at ``uncertainty_z`` standard errors, >= 0."""
        o = self._outcomes.get(request_id)
        if o is None:
            return 1.0
        w = self.prior_weight
        denominator = o.predicted + w
        rho = (o.accepted + w) / denominator
        return max(0.0, rho - self.uncertainty_z * (o.variance + w / 4) ** 0.5 / denominator)

    def correct(self, request_id: str, confidences: Sequence[float]) -> tuple[float, ...]:
        """The table-corrected conditional confidences of a request's block, scaled by its ratio."""
        rho = self.ratio(request_id)
        if rho == 1.0:
            return tuple(confidences)
        return tuple(min(MAX_CONFIDENCE, c * rho) for c in confidences)

    def observe(self, request_id: str, predicted: Sequence[float], num_verified: int, num_accepted: int) -> None:
        """A verify step of the request: the table's corrected confidences of its drafts (``predicted``, not
        scaled by the ratio), how many were verified and how many leading ones accepted."""
        reached = min(num_accepted + 1, num_verified, len(predicted))
        if reached <= 0:
            return
        o = self._outcomes.setdefault(request_id, _RequestOutcomes())
        for k in range(reached):
            p = min(1.0, max(0.0, float(predicted[k])))
            o.accepted += float(num_accepted > k)
            o.predicted += p
            o.variance += p * (1.0 - p)
        o.positions += reached
        o.steps += 1

    def probing(self, request_id: str) -> bool:
        """Fewer than ``probe_positions`` reached positions observed, in fewer than ``max_probes`` verify steps."""
        o = self._outcomes.get(request_id)
        return o is None or (o.positions < self.probe_positions and o.steps < self.max_probes)

    def probe_length(self, request_id: str, num_drafts: int) -> int:
        """Drafts to verify at least: ``probe_drafts`` (at most ``num_drafts``) while probing, else 0."""
        return min(self.probe_drafts, num_drafts) if self.probing(request_id) else 0

    def release(self, request_id: str) -> None:
        self._outcomes.pop(request_id, None)

    @property
    def num_tracked_requests(self) -> int:
        return len(self._outcomes)
