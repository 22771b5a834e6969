"""The throughput profile SPS(B, R): whole engine steps per second on a (B, R) grid.

DSpark's verification policy (DESIGN.md section 1, Algorithm 1) maximises
``Theta = E * SPS(B)``, so it needs the engine's step rate as a function of the step's size:
B = batch tokens sent to the target (prefill chunks + ``1 + l_r`` per decode request) and
R = decode requests (the drafter runs once per decode request). The profile stores the measured
*step time* (seconds, the reciprocal of SPS) on a grid and interpolates bilinearly between grid
points. Step time is kept monotone non-decreasing in B and in R: a bigger step never runs faster,
which the policy's early stop relies on to be meaningful.

With a drafter, the profile also keeps the drafter's share of a step, ``draft_time(R)`` (one drafter
forward for R requests, included in ``step_time``), so the scheduler can price drafting on its own:
a step that drafts for only D of its R requests takes ``step_time(B, R) - draft_time(R) +
draft_time(D)`` (``drafting_step_time``).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

PROFILE_FORMAT_VERSION = 1

ProfileKey = Mapping[str, "str | int | float | bool"]


class StepTimeModel(Protocol):
    """Anything that predicts the wall time of one engine step (seconds)."""

    def step_time(self, num_tokens: int, num_requests: int) -> float: ...


def drafting_step_time(
    model: StepTimeModel, num_tokens: int, num_requests: int, num_drafting: int, sampled_fraction: float = 0.0
) -> float:
    """Seconds of a step of B = ``num_tokens``, R = ``num_requests`` that runs the drafter for
    ``num_drafting`` of the R requests, ``sampled_fraction`` of them sampled (T > 0: the drafter also
    draws from q per slot, up to 4x dearer than greedy drafting here): the profile's step time (measured
    with greedy drafting for all R) minus the greedy drafter time plus the drafter time this step
    spends. Models without measured drafter times (``has_draft_time`` false) give the full step."""
    full = model.step_time(num_tokens, num_requests)
    if not getattr(model, "has_draft_time", False):
        return full
    spent = model.draft_time(num_drafting, sampled_fraction)  # type: ignore[attr-defined]
    return max(full - model.draft_time(num_requests) + spent, 1e-9)  # type: ignore[attr-defined]


def isotonic_non_decreasing(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit of ``values`` (pool-adjacent-violators algorithm).

    Unlike a cumulative max, one slow outlier is averaged with its neighbours instead of raising
    every later point.
    """
    blocks: list[tuple[float, int]] = []  # (sum, count) of each pooled run
    for value in values:
        total, count = float(value), 1
        while blocks and blocks[-1][0] / blocks[-1][1] > total / count:
            prev_total, prev_count = blocks.pop()
            total, count = total + prev_total, count + prev_count
        blocks.append((total, count))
    return [total / count for total, count in blocks for _ in range(count)]


def smooth_monotone(
    step_time_s: Sequence[Sequence[float]], isotonic: bool = True
) -> tuple[tuple[float, ...], ...]:
    """Make a step-time grid ``[num_batch_points][num_request_points]`` non-decreasing in both axes.

    Each column (fixed R) is fitted isotonically along B (or cumulative-maxed when
    ``isotonic=False``); then each row takes the cumulative max along R. The second pass keeps the
    first pass's monotonicity in B (a max of non-decreasing sequences is non-decreasing).
    """
    num_b, num_r = len(step_time_s), len(step_time_s[0])
    columns = []
    for k in range(num_r):
        column = [float(step_time_s[i][k]) for i in range(num_b)]
        columns.append(isotonic_non_decreasing(column) if isotonic else _cummax(column))
    return tuple(tuple(_cummax([columns[k][i] for k in range(num_r)])) for i in range(num_b))


def _cummax(values: Sequence[float]) -> list[float]:
    out, best = [], -math.inf
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def _bracket(grid: tuple[int, ...], x: float, extrapolate: bool) -> tuple[int, float]:
    """Index i and weight t with ``x = (1 - t) * grid[i] + t * grid[i + 1]``.

    Below the grid t clamps to 0; above it t exceeds 1 when ``extrapolate`` else clamps to 1.
    A one-point grid returns (0, 0.0).
    """
    if len(grid) == 1 or x <= grid[0]:
        return 0, 0.0
    i = min(bisect.bisect_right(grid, x) - 1, len(grid) - 2)
    t = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, (t if extrapolate else min(t, 1.0))


def _draft_curve(grid: tuple[int, ...], times: tuple[float, ...], num_requests: int) -> float:
    """Linear interpolation of drafter seconds over the R grid, through the origin, extrapolated."""
    i, t = _bracket((0, *grid), num_requests, extrapolate=True)
    padded = (0.0, *times)
    return max(0.0, (1 - t) * padded[i] + t * padded[i + 1])


def _floats(values: object) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None else None  # type: ignore[union-attr]


@dataclass(frozen=True)
class ThroughputProfile:
    """Measured whole-step time on a grid of batch tokens B and decode requests R.

    Attributes:
        batch_tokens: strictly increasing B grid (tokens per step, >= 1).
        num_requests: strictly increasing R grid (decode requests per step, >= 1).
        step_time_s: ``[len(batch_tokens)][len(num_requests)]`` seconds per step (target forward
            over B tokens + drafter for R requests + sampling), non-decreasing along both axes.
            Cells with B < R cannot be measured; ``measure_profile`` fills them from above.
        key: what the profile was measured on (model, dtype, device, settings); metadata only.
        draft_time_s: ``[len(num_requests)]`` seconds of the drafter forward alone for R greedy
            requests (part of ``step_time_s``), non-decreasing; None without a drafter or for profiles
            measured before it was recorded.
        draft_time_sampled_s: the same for R sampled requests (T = 1); None = as greedy.
    """

    batch_tokens: tuple[int, ...]
    num_requests: tuple[int, ...]
    step_time_s: tuple[tuple[float, ...], ...]
    key: ProfileKey = field(default_factory=dict, hash=False)
    draft_time_s: tuple[float, ...] | None = None
    draft_time_sampled_s: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, grid in (("batch_tokens", self.batch_tokens), ("num_requests", self.num_requests)):
            if not grid or grid[0] < 1 or any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
                raise ValueError(f"{name} must be a non-empty, strictly increasing grid of ints >= 1: {grid}")
        if len(self.step_time_s) != len(self.batch_tokens) or any(
            len(row) != len(self.num_requests) for row in self.step_time_s
        ):
            raise ValueError("step_time_s must have shape [len(batch_tokens)][len(num_requests)]")
        for i, row in enumerate(self.step_time_s):
            for k, value in enumerate(row):
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(
                        f"step time at B={self.batch_tokens[i]} R={self.num_requests[k]} must be > 0"
                    )
                if (i and value < self.step_time_s[i - 1][k]) or (k and value < row[k - 1]):
                    raise ValueError(
                        f"step time must be non-decreasing in B and R (at B={self.batch_tokens[i]}, "
                        f"R={self.num_requests[k]}); smooth it with smooth_monotone()"
                    )
        for name in ("draft_time_s", "draft_time_sampled_s"):
            draft = getattr(self, name)
            if draft is None:
                continue
            if len(draft) != len(self.num_requests):
                raise ValueError(f"{name} must have one value per num_requests grid point")
            increasing = all(a <= b for a, b in zip(draft, draft[1:], strict=False))
            if any(not (math.isfinite(t) and t >= 0) for t in draft) or not increasing:
                raise ValueError(f"{name} must be finite, >= 0 and non-decreasing in R: {draft}")
        if self.draft_time_sampled_s is not None and self.draft_time_s is None:
            raise ValueError("draft_time_sampled_s needs draft_time_s")

    @classmethod
    def from_measurements(
        cls,
        batch_tokens: Sequence[int],
        num_requests: Sequence[int],
        step_time_s: Sequence[Sequence[float]],
        key: ProfileKey | None = None,
        draft_time_s: Sequence[float] | None = None,
        draft_time_sampled_s: Sequence[float] | None = None,
    ) -> ThroughputProfile:
        """Build a profile from raw (noisy, possibly non-monotone) timings, smoothing them."""
        draft, sampled = (tuple(isotonic_non_decreasing(d)) if d is not None else None
                          for d in (draft_time_s, draft_time_sampled_s))
        return cls(tuple(batch_tokens), tuple(num_requests), smooth_monotone(step_time_s), dict(key or {}), draft,
                   sampled)

    @property
    def has_draft_time(self) -> bool:
        """Whether the drafter's share of a step was measured (``draft_time_s``)."""
        return self.draft_time_s is not None

    def draft_time(self, num_requests: int, sampled_fraction: float = 0.0) -> float:
        """Seconds of one drafter forward for ``num_requests`` requests of which ``sampled_fraction``
        are sampled (0 for none, or without ``draft_time_s``): each curve linear in R between grid
        points, from the origin below the first point, along the last segment's slope beyond the grid;
        the two curves mixed linearly by ``sampled_fraction``."""
        if self.draft_time_s is None or num_requests <= 0:
            return 0.0
        greedy = _draft_curve(self.num_requests, self.draft_time_s, num_requests)
        if not sampled_fraction or self.draft_time_sampled_s is None:
            return greedy
        sampled = _draft_curve(self.num_requests, self.draft_time_sampled_s, num_requests)
        return (1 - sampled_fraction) * greedy + sampled_fraction * sampled

    def step_time(self, num_tokens: int, num_requests: int) -> float:
        """Predicted seconds of one step with ``num_tokens`` batch tokens and ``num_requests`` decode
        requests: bilinear interpolation on the grid.

        R is clamped to the grid. B below the grid clamps; above it the time grows linearly with the
        steepest last-segment slope over all R columns (conservative and still monotone in B and R).
        """
        i, tb = _bracket(self.batch_tokens, num_tokens, extrapolate=False)
        k, tr = _bracket(self.num_requests, num_requests, extrapolate=False)
        lo, hi = self.step_time_s[i], self.step_time_s[min(i + 1, len(self.batch_tokens) - 1)]
        k1 = min(k + 1, len(self.num_requests) - 1)
        at_b = (1 - tb) * ((1 - tr) * lo[k] + tr * lo[k1]) + tb * ((1 - tr) * hi[k] + tr * hi[k1])
        excess = num_tokens - self.batch_tokens[-1]
        return at_b + excess * self._tail_slope if excess > 0 else at_b

    def sps(self, num_tokens: int, num_requests: int) -> float:
        """SPS(B, R): engine steps per second (1 / step time)."""
        return 1.0 / self.step_time(num_tokens, num_requests)

    @property
    def _tail_slope(self) -> float:
        """Seconds per extra batch token beyond the grid (max last-segment slope, >= 0)."""
        if len(self.batch_tokens) == 1:
            return 0.0
        db = self.batch_tokens[-1] - self.batch_tokens[-2]
        return max(b - a for a, b in zip(self.step_time_s[-2], self.step_time_s[-1], strict=True)) / db

    def cell_weights(self, num_tokens: int, num_requests: int) -> list[tuple[int, int, float]]:
        """Bilinear weights ``(i_batch, k_requests, weight)`` of the grid cells around (B, R),
        clamped to the grid; the weights are >= 0 and sum to 1 (zero-weight cells omitted)."""
        i, tb = _bracket(self.batch_tokens, num_tokens, extrapolate=False)
        k, tr = _bracket(self.num_requests, num_requests, extrapolate=False)
        i1, k1 = min(i + 1, len(self.batch_tokens) - 1), min(k + 1, len(self.num_requests) - 1)
        cells: dict[tuple[int, int], float] = {}
        for (a, b), w in (
            ((i, k), (1 - tb) * (1 - tr)),
            ((i1, k), tb * (1 - tr)),
            ((i, k1), (1 - tb) * tr),
            ((i1, k1), tb * tr),
        ):
            cells[(a, b)] = cells.get((a, b), 0.0) + w
        return [(a, b, w) for (a, b), w in cells.items() if w > 0]

    def to_dict(self) -> dict[str, object]:
        return {
            "version": PROFILE_FORMAT_VERSION,
            "key": dict(self.key),
            "batch_tokens": list(self.batch_tokens),
            "num_requests": list(self.num_requests),
            "step_time_s": [list(row) for row in self.step_time_s],
            "draft_time_s": list(self.draft_time_s) if self.draft_time_s is not None else None,
            "draft_time_sampled_s": list(self.draft_time_sampled_s) if self.draft_time_sampled_s is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ThroughputProfile:
        version = data.get("version")
        if version != PROFILE_FORMAT_VERSION:
            raise ValueError(f"unsupported profile version {version!r} (expected {PROFILE_FORMAT_VERSION})")
        return cls(
            batch_tokens=tuple(int(b) for b in data["batch_tokens"]),  # type: ignore[union-attr]
            num_requests=tuple(int(r) for r in data["num_requests"]),  # type: ignore[union-attr]
            step_time_s=tuple(tuple(float(t) for t in row) for row in data["step_time_s"]),  # type: ignore[union-attr]
            key=dict(data.get("key") or {}),  # type: ignore[call-overload]
            draft_time_s=_floats(data.get("draft_time_s")),
            draft_time_sampled_s=_floats(data.get("draft_time_sampled_s")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ThroughputProfile:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (atomically: temp file + rename), creating parent folders."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ThroughputProfile:
        return cls.from_json(Path(path).read_text())
