"""Online drift correction of the throughput profile from live step timings.

The start-up profile goes stale when the machine's speed drifts (other load, thermal limits) or
when the real steps differ from the profiled ones (longer contexts make attention dearer). There is
no idle core to re-profile, so the engine reports every step's measured time and the profile is
corrected in log space:

    predicted(B, R) = base(B, R) * exp(g + r(B, R))

- g, the global log-scale: an EWMA of ``log(measured / base)`` with rate ``global_rate``.
- r, a per-grid-cell residual: an EWMA of ``log(measured / base) - g`` at the observed cell
  (bilinear weights), with the slower rate ``cell_rate``; it learns a persistent shape error.

Convergence (noise-free step change of the machine speed by a factor k, every step observed):
the global log error is ``|log k| * (1 - global_rate) ** n`` after n steps; with the default 0.25,
10 steps leave 5.6% of the log error, i.e. a 2x slowdown is predicted within 4% everywhere. While g
catches up, the residuals pick up part of the transient, at most about
``cell_rate / global_rate * |log k|`` (8% of the log change with the defaults: < 6% for k = 2), and
give it back at the slower rate. A persistent per-cell shape error settles in ~1 / cell_rate (50)
observations of that cell. Each observation's log ratio is clipped to ``+-max_log_ratio`` around
the current global estimate g, so a single stall (GC pause, page fault) cannot swing the profile,
while a profile that is k times off for good (measured on a loaded machine, then cached) is
followed all the way: g moves up to ``global_rate * max_log_ratio`` per step towards log k
(k = 20 within about 15 steps with the defaults). A global correction beyond 2x either way after 64
steps is logged once: the cached profile should be re-measured.

Limitation: residuals are local to the observed cells and the corrected grid is re-made monotone
(cumulative max), so a cell observed to run faster than the global scale says is still predicted no
faster than a smaller neighbouring step that carries only the global scale.
"""

from __future__ import annotations

import logging
import math

from sparkserve.scheduler.profile.grid import ThroughputProfile, smooth_monotone

logger = logging.getLogger(__name__)


class OnlineProfile:
    """A ``ThroughputProfile`` corrected online; predicts with the same interface."""

    CONTRADICTED_FACTOR = 2.0  # a global correction beyond this (either way) after 64 steps is logged once

    def __init__(
        self,
        base: ThroughputProfile,
        global_rate: float = 0.25,
        cell_rate: float = 0.02,
        max_log_ratio: float = math.log(4.0),
    ) -> None:
        if not (0 < global_rate <= 1 and 0 <= cell_rate <= 1 and max_log_ratio > 0):
            raise ValueError("need 0 < global_rate <= 1, 0 <= cell_rate <= 1 and max_log_ratio > 0")
        self.base = base
        self.global_rate = global_rate
        self.cell_rate = cell_rate
        self.max_log_ratio = max_log_ratio
        self.num_observations = 0
        self._log_scale = 0.0  # g
        self._residual = [[0.0] * len(base.num_requests) for _ in base.batch_tokens]  # [B grid][R grid]
        self._current: ThroughputProfile | None = base
        self._warned = False

    @property
    def scale(self) -> float:
        """Global correction factor exp(g): measured / profiled step time (2.0 = twice as slow)."""
        return math.exp(self._log_scale)

    def observe(self, num_tokens: int, num_requests: int, measured_step_time_s: float) -> None:
        """Fold in one step that took ``measured_step_time_s`` seconds at (B, R)."""
        if not (math.isfinite(measured_step_time_s) and measured_step_time_s > 0):
            raise ValueError(f"measured step time must be > 0 seconds, got {measured_step_time_s}")
        log_ratio = math.log(measured_step_time_s / self.base.step_time(num_tokens, num_requests))
        # clip around the current global estimate, not around the base: a single stall moves g by at most
        # global_rate * max_log_ratio, while a profile that is persistently k times off (one measured on a
        # loaded machine and cached) is still followed all the way, whatever k
        deviation = max(-self.max_log_ratio, min(self.max_log_ratio, log_ratio - self._log_scale))
        log_ratio = self._log_scale + deviation
        self._log_scale += self.global_rate * deviation
        if (not self._warned and self.num_observations >= 64
                and abs(self._log_scale) > math.log(self.CONTRADICTED_FACTOR)):
            self._warned = True
            logger.warning(
                "the throughput profile (key %s) is contradicted by the served steps: they run %.2fx its "
                "prediction; the online correction is used, but re-measure it (`sparkserve profile`, or delete "
                "the cached file) so the next start does not begin from it", self.base.key, self.scale)
        target = log_ratio - self._log_scale
        for i, k, weight in self.base.cell_weights(num_tokens, num_requests):
            self._residual[i][k] += self.cell_rate * weight * (target - self._residual[i][k])
        self.num_observations += 1
        self._current = None

    @property
    def current(self) -> ThroughputProfile:
        """The corrected profile (grid times base * exp(g + r), made monotone by cumulative max)."""
        if self._current is None:
            grid = [
                [t * math.exp(self._log_scale + r) for t, r in zip(row, res, strict=True)]
                for row, res in zip(self.base.step_time_s, self._residual, strict=True)
            ]
            self._current = ThroughputProfile(
                self.base.batch_tokens,
                self.base.num_requests,
                smooth_monotone(grid, isotonic=False),
                self.base.key,
                self.base.draft_time_s,
                self.base.draft_time_sampled_s,
            )
        return self._current

    @property
    def has_draft_time(self) -> bool:
        return self.base.has_draft_time

    def draft_time(self, num_requests: int, sampled_fraction: float = 0.0) -> float:
        """Drafter seconds for R requests, scaled by the global correction exp(g)."""
        return self.base.draft_time(num_requests, sampled_fraction) * self.scale

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        """Predicted seconds per step at (B, R), drift-corrected."""
        return self.current.step_time(num_tokens, num_requests)

    def sps(self, num_tokens: int, num_requests: int) -> float:
        """Drift-corrected SPS(B, R) (steps per second)."""
        return 1.0 / self.step_time(num_tokens, num_requests)
