"""Self-calibrating draft confidences: the engine sees every verification outcome and corrects the
confidences the policy and the drafting gate rank by, online.

A drafter's confidence c_k estimates the conditional survival P(draft k accepted | drafts before it
accepted). For every verify step of a request with l drafts and a accepted, positions k = 1 .. min(a+1, l)
were *reached* (all before accepted) and their outcome is ``a >= k``: unbiased samples of the conditional
survival at the confidence the drafter stated. Per drafter, temperature class (greedy / sampled) and
position, observations are binned by stated confidence; every ``refit_every`` observations an isotonic
(pool-adjacent-violators) fit maps stated -> realised survival, shrunk towards the identity where a bin
has little data (``prior_weight`` pseudo-observations). Memory is bounded (fixed bins; counts decay by
half once a position holds ``max_weight`` observations), so the map follows the traffic.

Conservative until calibrated (issue 25): the prior is ``prior_scale`` x the stated confidence (an
under-prediction: a fresh server's drafter is usually over-confident on traffic it was not trained on,
and over-verifying costs more than under-verifying near break-even), used as it is before a table has
its first fit and as the shrinkage target of every bin afterwards; and every fitted rate is lowered by
``uncertainty_z`` standard errors of the bin, ``sqrt(p (1 - p) / (n + prior_weight))``, so the expected
gain of the policy is discounted by how little is known, and the discount vanishes as data arrives.

The correction only changes how much is verified and who drafts, never what is emitted: verification is
lossless for any verify length, and the policy stays non-anticipating because the map is fitted on
outcomes of earlier steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NUM_BINS = 10


def pool_adjacent_violators(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted isotonic (non-decreasing) regression of ``values`` (Ayer et al. 1955, PAV)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            total = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / total if total else (m1 + m2) / 2, total, n1 + n2])
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * int(count))
    return out


@dataclass
class _PositionStats:
    """Binned observations at one draft position."""

    weight: list[float] = field(default_factory=lambda: [0.0] * NUM_BINS)
    stated: list[float] = field(default_factory=lambda: [0.0] * NUM_BINS)  # sum of stated confidences
    accepted: list[float] = field(default_factory=lambda: [0.0] * NUM_BINS)
    fit: list[tuple[float, float]] | None = None  # (stated, corrected) knots

    def add(self, confidence: float, accepted: bool) -> None:
        b = min(int(confidence * NUM_BINS), NUM_BINS - 1)
        self.weight[b] += 1.0
        self.stated[b] += confidence
        self.accepted[b] += float(accepted)

    def total(self) -> float:
        return sum(self.weight)

    def halve(self) -> None:
        for series in (self.weight, self.stated, self.accepted):
            series[:] = [x * 0.5 for x in series]

    def refit(self, prior_weight: float, prior_scale: float = 1.0, uncertainty_z: float = 0.0) -> None:
        """Isotonic fit of the realised rate per bin, each shrunk to ``prior_scale`` x its stated mean by
        the prior and lowered by ``uncertainty_z`` standard errors (module docstring)."""
        bins = [b for b in range(NUM_BINS) if self.weight[b] > 0]
        if not bins:
            self.fit = None
            return
        stated = [self.stated[b] / self.weight[b] for b in bins]
        rates = []
        for b, s in zip(bins, stated, strict=True):
            n = self.weight[b] + prior_weight
            p = (self.accepted[b] + prior_weight * prior_scale * s) / n
            rates.append(max(0.0, p - uncertainty_z * (p * (1.0 - p) / n) ** 0.5))
        fitted = pool_adjacent_violators(rates, [self.weight[b] + prior_weight for b in bins])
        self.fit = list(zip(stated, fitted, strict=True))

    def correct(self, confidence: float, prior_scale: float = 1.0) -> float:
        if not self.fit:
            return confidence * prior_scale
        knots = self.fit
        if confidence <= knots[0][0]:
            return knots[0][1] * confidence / knots[0][0] if knots[0][0] > 0 else knots[0][1]
        for (x0, y0), (x1, y1) in zip(knots, knots[1:], strict=False):
            if confidence <= x1:
                return y0 + (confidence - x0) * (y1 - y0) / (x1 - x0) if x1 > x0 else y1
        x, y = knots[-1]  # beyond the data: keep the last knot's ratio
        return min(1.0, confidence * y / x) if x > 0 else y


@dataclass(frozen=True)
class CalibrationRow:
    """What metrics report per (drafter, temperature class, position): verified drafts, and the sums of
    stated and corrected confidences and of acceptances over them (cumulative)."""

    drafter: str
    greedy: bool
    position: int
    verified: int
    stated: float
    corrected: float
    accepted: int


@dataclass
class OnlineCalibration:
    """Online correction of draft confidences (module docstring).

    Attributes:
        refit_every: observations between refits of a (drafter, class) table.
        prior_weight: pseudo-observations at the stated confidence in every bin.
        max_weight: a position's observations are halved beyond this (bounded memory, recency).
        prior_scale: the prior's realised / stated survival (1.0: the identity; < 1: under-predicts).
        uncertainty_z: standard errors taken off each fitted rate (0: the plain fit).
    """

    refit_every: int = 200
    prior_weight: float = 20.0
    max_weight: float = 50_000.0
    prior_scale: float = 1.0
    uncertainty_z: float = 0.0
    _tables: dict[tuple[str, bool], list[_PositionStats]] = field(default_factory=dict)
    _since_refit: dict[tuple[str, bool], int] = field(default_factory=dict)
    _report: dict[tuple[str, bool, int], list[float]] = field(default_factory=dict)

    def _table(self, drafter: str, greedy: bool, width: int) -> list[_PositionStats]:
        table = self._tables.setdefault((drafter, greedy), [])
        while len(table) < width:
            table.append(_PositionStats())
        return table

    def correct(self, drafter: str, greedy: bool, confidences: Sequence[float]) -> tuple[float, ...]:
        """The corrected conditional confidences of a block (``prior_scale`` x stated until data arrives)."""
        table = self._tables.get((drafter, greedy))
        scale = self.prior_scale
        if table is None:
            return tuple(c * scale for c in confidences)
        return tuple(table[k].correct(c, scale) if k < len(table) else c * scale for k, c in enumerate(confidences))

    def observe(self, drafter: str, greedy: bool, confidences: Sequence[float], num_verified: int,
                num_accepted: int) -> None:
        """One verify step of a request: the stated confidences of its ``num_verified`` drafts and how many
        leading ones were accepted."""
        reached = min(num_accepted + 1, num_verified, len(confidences))
        if reached <= 0:
            return
        key = (drafter, greedy)
        table = self._table(drafter, greedy, reached)
        for k in range(reached):
            c = float(confidences[k])
            corrected = table[k].correct(c, self.prior_scale)
            table[k].add(c, num_accepted > k)
            if table[k].total() > self.max_weight:
                table[k].halve()
            row = self._report.setdefault((drafter, greedy, k), [0.0, 0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += c
            row[2] += corrected
            row[3] += float(num_accepted > k)
        self._since_refit[key] = self._since_refit.get(key, 0) + reached
        if self._since_refit[key] >= self.refit_every:
            self._since_refit[key] = 0
            for stats in table:
                stats.refit(self.prior_weight, self.prior_scale, self.uncertainty_z)

    def report(self) -> list[CalibrationRow]:
        """Cumulative predicted vs realised survival per drafter, class and position."""
        return [CalibrationRow(d, g, k, int(v[0]), v[1], v[2], int(v[3])) for (d, g, k), v in sorted(self._report.items())]


def conservative_calibration() -> OnlineCalibration:
    """The engine's calibration (issue 25): a prior at 0.8 x the stated confidence, one standard error
    off every fitted rate, refits every 50 observations (the first fit comes sooner than the default's
    200, so the prior's under-prediction is short-lived)."""
    return OnlineCalibration(refit_every=50, prior_scale=0.8, uncertainty_z=1.0)
