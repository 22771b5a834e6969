"""The speculation guard: speculation measured against plain decoding, online, and backed off where it loses.

The policy's choices rest on predictions (the SPS(B, R) profile, the calibrated confidences); when those are
wrong the policy can verify at a loss. The guard checks the outcome instead of the prediction. For every
*speculative* engine step (one that verified drafts or ran the drafter) it compares

    realised    = tokens emitted by the step (R + accepted drafts) over its measured wall time (which
                  includes the drafter's forward for the next drafts)
    plain       = R over the predicted wall time of a plain step at the same batch (B without the verify
                  rows, no drafter), the profile's prediction corrected by measured plain steps

Over a window of speculative steps the ratio estimate is

    speedup = sum_i(x_i) / sum_i(y_i),   x_i = emitted_i * plain_i / R_i,   y_i = duration_i

the time plain decoding would have needed for the same tokens over the time spent (< 1: speculation
loses), with the delta-method standard error ``se = sqrt(sum_i (x_i - speedup y_i)^2 / (n (n - 1))) / mean(y)``
(ratio estimator, Cochran, Sampling Techniques, 1977, section 6.3). The window is a sequential test: from
``min_window`` steps on it closes as soon as ``speedup +- z se`` lies wholly below or above ``threshold``,
and at ``max_window`` steps it closes on the point estimate; near break-even it thus waits for more steps
instead of reacting to the noise of a few acceptances. A window closing below ``threshold`` *backs off*:
for ``backoff_steps`` engine steps nobody verifies or drafts (plain decode steps, whose measured times
correct the plain reference), then the guard *probes* with speculation again for one window. A probe that
loses again doubles the back-off (up to ``max_backoff_steps``); one that wins resets it.

The plain reference trusts the profile only as far as measured plain steps agree: an EWMA of
``log(measured / predicted)`` over plain decode steps (``plain_scale``) multiplies the start-up profile's
plain prediction, so a profile that the plain steps contradict (e.g. one whose online scale was pulled up
by verify steps dearer than it thought) does not make speculation look better than it is. Plain steps come
by themselves (a request's first decode step has no drafts; high load, where the gate drafts for nobody);
when none came for ``plain_refresh`` steps, or none at all when a window closes, the guard runs
``plain_probe_steps`` plain steps to measure one (the cost: that many steps without speculation's gain).

Losslessness: the guard only sets verify lengths to 0 and switches drafting off, and it decides from
outcomes of steps already verified (the non-anticipating rule of the dspark policy, DESIGN.md section 1):
verification is lossless at any verify length, so a seeded request's text does not change
(tests/engine/spec_decode/test_guard_lossless.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GuardStats:
    """What metrics read from the guard.

    Attributes:
        backing_off: True while speculation is off (``sparkserve:spec_decode_backoff``).
        num_backoffs: back-offs so far.
        last_speedup: speedup of the latest complete window (None before any).
        plain_scale: measured / profiled time of plain decode steps (1.0 before any).
    """

    backing_off: bool
    num_backoffs: int
    last_speedup: float | None
    plain_scale: float


@dataclass
class SpeculationGuard:
    """Online comparison of speculative steps against plain decoding with back-off (module docstring).

    Attributes:
        min_window / max_window: speculative steps before a window may close / must close.
        z: standard errors of the sequential test.
        threshold: back off when the window's speedup is below this.
        backoff_steps: engine steps without speculation after a first losing window.
        max_backoff_steps: cap of the doubled back-off.
        plain_rate: EWMA rate of ``plain_scale`` (log space), per plain decode step.
        plain_refresh: engine steps without a plain decode step before a plain probe.
        plain_probe_steps: plain steps of one plain probe.
    """

    min_window: int = 8
    max_window: int = 48
    z: float = 2.0
    threshold: float = 1.0
    backoff_steps: int = 64
    max_backoff_steps: int = 1024
    plain_rate: float = 0.1
    plain_refresh: int = 256
    plain_probe_steps: int = 2
    num_backoffs: int = 0
    last_speedup: float | None = None
    _log_plain_scale: float = 0.0
    _plain_seen: bool = False
    _sums: list[float] = field(default_factory=lambda: [0.0] * 6)  # n, x, y, xx, yy, xy
    _steps_left: int = 0
    _plain_probe_left: int = 0
    _since_plain: int = 0
    _next_backoff: int = 0

    def __post_init__(self) -> None:
        if not (1 < self.min_window <= self.max_window and 1 <= self.backoff_steps <= self.max_backoff_steps):
            raise ValueError("need 1 < min_window <= max_window and 1 <= backoff_steps <= max_backoff_steps")
        if not (self.threshold > 0 and self.z >= 0 and 0 < self.plain_rate <= 1):
            raise ValueError("need threshold > 0, z >= 0 and 0 < plain_rate <= 1")
        self._next_backoff = self.backoff_steps

    @property
    def backing_off(self) -> bool:
        """True while speculation is backed off after a losing window."""
        return self._steps_left > 0

    @property
    def speculating(self) -> bool:
        """False while backing off or probing plain steps: verify nothing, draft nothing."""
        return self._steps_left == 0 and self._plain_probe_left == 0

    @property
    def plain_scale(self) -> float:
        """Measured / predicted time of plain decode steps (EWMA in log space)."""
        return math.exp(self._log_plain_scale)

    def observe(self, num_decode_requests: int, num_emitted_tokens: int, num_verify_tokens: int,
                duration_s: float, plain_step_time_s: float, num_drafting: int = 0) -> None:
        """One engine step's outcome (already verified: nothing here can change what it emitted).

        Args:
            num_decode_requests: R, requests that sampled in the step.
            num_emitted_tokens: tokens the step emitted (R + accepted drafts).
            num_verify_tokens: draft tokens verified (sum l_r).
            duration_s: measured wall time of the step, seconds.
            plain_step_time_s: the profile's predicted time of a plain step at the same batch (B minus the
                verify rows, R, no drafter), seconds, before the ``plain_scale`` correction.
            num_drafting: requests the drafter ran for in the step; a step with no verify tokens and no
                drafting is a plain step (it measures the plain reference).
        Raises ValueError for a non-positive time.
        """
        if not (duration_s > 0 and plain_step_time_s > 0):
            raise ValueError(f"step times must be > 0 seconds, got {duration_s}, {plain_step_time_s}")
        if self._steps_left > 0:
            self._steps_left -= 1
        elif self._plain_probe_left > 0:
            self._plain_probe_left -= 1
        if num_decode_requests <= 0:
            return
        if num_verify_tokens == 0 and num_drafting == 0:
            self._observe_plain(duration_s / plain_step_time_s)
            return
        self._since_plain += 1
        if self._since_plain >= self.plain_refresh and self.speculating:
            self._plain_probe_left = self.plain_probe_steps
        x, y = plain_step_time_s * num_emitted_tokens / num_decode_requests, duration_s  # x scaled at the test
        for k, v in enumerate((1.0, x, y, x * x, y * y, x * y)):
            self._sums[k] += v
        self._test()

    def stats(self) -> GuardStats:
        return GuardStats(self.backing_off, self.num_backoffs, self.last_speedup, self.plain_scale)

    def _observe_plain(self, ratio: float) -> None:
        self._since_plain = 0
        log_ratio = max(-math.log(4.0), min(math.log(4.0), math.log(ratio)))
        if not self._plain_seen:
            self._log_plain_scale, self._plain_seen = log_ratio, True
        else:
            self._log_plain_scale += self.plain_rate * (log_ratio - self._log_plain_scale)

    def _test(self) -> None:
        """The sequential test of the open window (module docstring)."""
        n, sx, sy, sxx, syy, sxy = self._sums
        if n < self.min_window:
            return
        if not self._plain_seen:  # no plain reference measured yet: measure one, keep the window open
            self._plain_probe_left = self.plain_probe_steps
            return
        scale = self.plain_scale
        speedup = scale * sx / sy
        resid = scale * scale * sxx - 2.0 * speedup * scale * sxy + speedup * speedup * syy  # sum (x - S y)^2
        se = math.sqrt(max(resid, 0.0) / (n * (n - 1))) / (sy / n)
        if n < self.max_window and speedup - self.z * se < self.threshold < speedup + self.z * se:
            return  # undecided: more steps
        self.last_speedup = speedup
        self._sums = [0.0] * 6
        if speedup < self.threshold:
            self._steps_left = self._next_backoff
            self._next_backoff = min(2 * self._next_backoff, self.max_backoff_steps)
            self.num_backoffs += 1
        else:
            self._next_backoff = self.backoff_steps
