"""Throughput profile: interpolation, monotone smoothing, JSON, measuring, cache path, drift."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.scheduler.profile import (
    OnlineProfile,
    ThroughputProfile,
    default_grid,
    drafting_step_time,
    isotonic_non_decreasing,
    measure_profile,
    profile_cache_path,
    smooth_monotone,
)
from sparkserve.scheduler.profile.measure import time_cell

PROFILE_PATH = Path(__file__).resolve().parents[2] / "data" / "profile_small.json"

# B grid (1, 3, 5), R grid (1, 2); step times in seconds.
SMALL = ThroughputProfile((1, 3, 5), (1, 2), ((1.0, 2.0), (2.0, 3.0), (4.0, 4.0)))


def is_monotone(grid) -> bool:
    rows_ok = all(b >= a for row in grid for a, b in zip(row, row[1:], strict=False))
    cols_ok = all(b >= a for r0, r1 in zip(grid, grid[1:], strict=False) for a, b in zip(r0, r1, strict=True))
    return rows_ok and cols_ok


# ---- smoothing ------------------------------------------------------------------------------------


def test_isotonic_pools_violators() -> None:
    assert isotonic_non_decreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic_non_decreasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert isotonic_non_decreasing([]) == []


@given(st.lists(st.floats(0.001, 100.0), min_size=1, max_size=30))
def test_isotonic_property(values: list[float]) -> None:
    fit = isotonic_non_decreasing(values)
    assert len(fit) == len(values)
    assert all(b >= a for a, b in zip(fit, fit[1:], strict=False))
    assert sum(fit) == pytest.approx(sum(values))  # PAVA preserves the mean
    if values == sorted(values):
        assert fit == pytest.approx(values)


def test_smooth_monotone_by_hand() -> None:
    # Column R=1 has a noisy dip (isotonic averages it); row B=1 decreases in R (cumulative max).
    raw = [[1.0, 0.9], [3.0, 3.5], [2.0, 4.0]]
    assert smooth_monotone(raw) == ((1.0, 1.0), (2.5, 3.5), (2.5, 4.0))
    assert smooth_monotone(raw, isotonic=False) == ((1.0, 1.0), (3.0, 3.5), (3.0, 4.0))


@given(
    st.integers(1, 6).flatmap(
        lambda n: st.lists(st.lists(st.floats(0.001, 10.0), min_size=n, max_size=n), min_size=1, max_size=8)
    )
)
def test_smooth_monotone_property(raw: list[list[float]]) -> None:
    smooth = smooth_monotone(raw)
    assert is_monotone(smooth)
    if is_monotone(raw):
        assert smooth == tuple(tuple(r) for r in raw)  # already monotone: unchanged


# ---- interpolation -------------------------------------------------------------------------------


def test_interpolation_by_hand() -> None:
    assert SMALL.step_time(3, 1) == 2.0  # grid point
    assert SMALL.step_time(2, 1) == pytest.approx(1.5)  # along B
    assert SMALL.step_time(1, 1.5) == pytest.approx(1.5)  # along R
    assert SMALL.step_time(2, 1.5) == pytest.approx((1.0 + 2.0 + 2.0 + 3.0) / 4)  # bilinear
    assert SMALL.step_time(0, 0) == 1.0  # below the grid: clamped
    assert SMALL.step_time(3, 9) == 3.0  # R beyond the grid: clamped
    # B beyond the grid: steepest last-segment slope over R, (4 - 2) / 2 = 1 s per token.
    assert SMALL.step_time(7, 1) == pytest.approx(6.0)
    assert SMALL.step_time(7, 2) == pytest.approx(6.0)
    assert SMALL.sps(3, 2) == pytest.approx(1 / 3)
    single = ThroughputProfile((4,), (1,), ((0.5,),))
    assert single.step_time(1, 1) == single.step_time(100, 7) == 0.5


def test_cell_weights() -> None:
    assert SMALL.cell_weights(3, 1) == [(1, 0, 1.0)]
    weights = dict(((i, k), w) for i, k, w in SMALL.cell_weights(2, 1.5))
    assert weights == {(0, 0): 0.25, (1, 0): 0.25, (0, 1): 0.25, (1, 1): 0.25}
    assert sum(w for *_, w in SMALL.cell_weights(99, 99)) == pytest.approx(1.0)


grids = st.tuples(st.integers(1, 5), st.integers(1, 4)).flatmap(
    lambda shape: st.tuples(
        st.lists(st.integers(1, 300), min_size=shape[0], max_size=shape[0], unique=True).map(sorted),
        st.lists(st.integers(1, 64), min_size=shape[1], max_size=shape[1], unique=True).map(sorted),
        st.lists(
            st.lists(st.floats(0.001, 1.0), min_size=shape[1], max_size=shape[1]),
            min_size=shape[0],
            max_size=shape[0],
        ),
    )
)


@settings(max_examples=200, deadline=None)
@given(grids, st.integers(0, 400), st.integers(0, 80), st.integers(0, 20), st.integers(0, 20))
def test_step_time_monotone_everywhere(grid, b, r, db, dr) -> None:
    batch, requests, raw = grid
    profile = ThroughputProfile.from_measurements(batch, requests, raw)
    t = profile.step_time(b, r)
    assert t > 0
    assert profile.step_time(b + db, r) >= t * (1 - 1e-12)
    assert profile.step_time(b, r + dr) >= t * (1 - 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_tokens": (1, 1)}, "strictly increasing"),
        ({"batch_tokens": ()}, "strictly increasing"),
        ({"num_requests": (0, 2)}, "strictly increasing"),
        ({"step_time_s": ((1.0, 2.0),)}, "shape"),
        ({"step_time_s": ((1.0, 2.0), (2.0, 3.0), (0.0, 4.0))}, "> 0"),
        ({"step_time_s": ((1.0, 2.0), (2.0, 3.0), (1.5, 4.0))}, "non-decreasing"),
        ({"step_time_s": ((1.0, 2.0), (2.0, 1.9), (4.0, 4.0))}, "non-decreasing"),
    ],
)
def test_validation(kwargs, match) -> None:
    fields = {
        "batch_tokens": SMALL.batch_tokens,
        "num_requests": SMALL.num_requests,
        "step_time_s": SMALL.step_time_s,
    }
    with pytest.raises(ValueError, match=match):
        ThroughputProfile(**{**fields, **kwargs})


# ---- JSON -----------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    profile = ThroughputProfile(
        SMALL.batch_tokens, SMALL.num_requests, SMALL.step_time_s, {"model": "m", "gamma": 7}
    )
    assert ThroughputProfile.from_json(profile.to_json()) == profile
    path = tmp_path / "sub" / "p.json"
    profile.save(path)
    loaded = ThroughputProfile.load(path)
    assert loaded == profile and loaded.key == {"model": "m", "gamma": 7}
    with pytest.raises(ValueError, match="version"):
        ThroughputProfile.from_dict({**profile.to_dict(), "version": 99})


def test_fixed_profile_file_loads() -> None:
    profile = ThroughputProfile.load(PROFILE_PATH)
    assert profile.key["device"] == "cpu"
    # The file mimics this CPU: 8 tokens/seq cost ~1.02x one token at batch 1, ~2.4x at 16, ~4.4x at 64.
    for r, lo, hi in ((1, 1.0, 1.05), (16, 2.0, 2.6), (64, 3.8, 4.6)):
        assert lo < profile.step_time(8 * r, r) / profile.step_time(r, r) < hi


def test_draft_time_interpolation_round_trip_and_drafting_step_time(tmp_path: Path) -> None:
    """draft_time(R): linear from the origin through the R grid, extrapolated along the last segment;
    drafting_step_time removes the drafter time of the requests that do not draft."""
    profile = ThroughputProfile(SMALL.batch_tokens, SMALL.num_requests, SMALL.step_time_s, {}, (0.2, 0.5))
    assert profile.has_draft_time and not SMALL.has_draft_time
    assert profile.draft_time(0) == 0.0 and profile.draft_time(1) == pytest.approx(0.2)
    assert profile.draft_time(2) == pytest.approx(0.5) and profile.draft_time(4) == pytest.approx(1.1)
    assert ThroughputProfile.from_json(profile.to_json()) == profile
    profile.save(tmp_path / "p.json")
    assert ThroughputProfile.load(tmp_path / "p.json").draft_time_s == (0.2, 0.5)
    # step (B=3, R=2) = 3.0 s with both drafting; one drafting saves 0.5 - 0.2; none saves 0.5
    assert drafting_step_time(profile, 3, 2, 2) == pytest.approx(3.0)
    assert drafting_step_time(profile, 3, 2, 1) == pytest.approx(2.7)
    assert drafting_step_time(profile, 3, 2, 0) == pytest.approx(2.5)
    assert drafting_step_time(SMALL, 3, 2, 0) == pytest.approx(3.0)  # no drafter times: the full step
    online = OnlineProfile(profile)
    online.observe(3, 2, 6.0)  # twice as slow: the drafter share scales with the global factor
    assert online.has_draft_time and online.draft_time(2) == pytest.approx(0.5 * online.scale)
    assert ThroughputProfile.from_measurements((1,), (1, 2), ((1.0, 2.0),), None, (0.3, 0.1)).draft_time_s == (0.2, 0.2)
    for bad in ((0.1,), (0.5, 0.2), (-0.1, 0.2)):
        with pytest.raises(ValueError, match="draft_time_s"):
            ThroughputProfile(SMALL.batch_tokens, SMALL.num_requests, SMALL.step_time_s, {}, bad)


def test_measure_profile_times_the_drafter_per_request_count() -> None:
    seen: list[tuple[int, bool]] = []

    def draft_fn(r: int, sampled: bool) -> float:
        seen.append((r, sampled))
        return (0.04 if sampled else 0.01) * r

    profile = measure_profile(lambda b, r: 0.1 * b + 0.01 * r, (1, 2, 4), (1, 2, 4), repeats=1, warmup=1,
                              draft_fn=draft_fn)
    assert seen == [(r, s) for s in (False, True) for r in (1, 1, 2, 2, 4, 4)]
    assert profile.draft_time_s == pytest.approx((0.01, 0.02, 0.04))
    assert profile.draft_time_sampled_s == pytest.approx((0.04, 0.08, 0.16))
    # a sampled request's drafting costs 4x here: a half-sampled batch pays the mean
    assert profile.draft_time(2, sampled_fraction=0.5) == pytest.approx(0.05)
    # a step of R = 4 drafting for 2 sampled requests: full step - 4 greedy drafts + 2 sampled drafts
    assert drafting_step_time(profile, 4, 4, 2, 1.0) == pytest.approx(profile.step_time(4, 4) - 0.04 + 0.08)
    assert ThroughputProfile.from_json(profile.to_json()) == profile


# ---- measuring, grid, cache path -----------------------------------------------------------------


def test_measure_profile_orchestration() -> None:
    calls: list[tuple[int, int]] = []
    noise = iter([0.0, 5.0, 0.0] * 1000)  # the median of 3 repeats drops the 5 s outlier

    def step_fn(b: int, r: int) -> float:
        assert b >= r, "impossible steps are never run"
        calls.append((b, r))
        return 0.01 * b + 0.001 * r + next(noise)

    profile = measure_profile(
        step_fn, (1, 2, 4), (1, 2, 4), repeats=3, warmup=0, progress=True, key={"k": "v"}
    )
    assert len(calls) == 3 * 6  # cells with B >= R: (1,1) (2,1) (2,2) (4,1) (4,2) (4,4)
    assert profile.key == {"k": "v"}
    assert profile.step_time(4, 4) == pytest.approx(0.044)
    assert profile.step_time(1, 4) == pytest.approx(0.044)  # B < R cells take the first measured value
    assert is_monotone(profile.step_time_s)


def test_measure_profile_warmup_and_errors() -> None:
    calls: list[tuple[int, int]] = []
    measure_profile(lambda b, r: calls.append((b, r)) or 0.1, (2,), (1, 2), repeats=1, warmup=2)
    assert calls == [(2, 1)] * 3 + [(2, 2)] * 3
    with pytest.raises(ValueError, match="B >= R"):
        measure_profile(lambda b, r: 0.1, (1,), (2,))
    with pytest.raises(ValueError, match="repeats"):
        measure_profile(lambda b, r: 0.1, (1,), (1,), repeats=0)


def test_slow_cells_take_one_call() -> None:
    """A cell whose warm-up call takes ``slow_cell_s`` or more is that one call; faster cells warm up and
    take the median of ``repeats`` (the first-start budget: large-B cells cost one step)."""
    calls: list[tuple[int, int]] = []

    def step_fn(b: int, r: int) -> float:
        calls.append((b, r))
        return 0.1 * b

    profile = measure_profile(step_fn, (1, 2, 4), (1,), repeats=3, warmup=1, slow_cell_s=0.2)
    assert calls == [(1, 1)] * 4 + [(2, 1)] + [(4, 1)]
    assert profile.step_time_s == ((0.1,), (0.2,), (0.4,))
    assert time_cell(lambda: 0.5, repeats=3, warmup=0, slow_cell_s=0.2) == 0.5  # no warm-up: always timed


def test_default_grid() -> None:
    batch, requests = default_grid(512, 64)
    assert batch == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert requests == (1, 2, 4, 16, 64)
    assert default_grid(1, 1) == ((1,), (1,))
    assert default_grid(100, 256) == (default_grid(100, 100)[0], (1, 2, 4, 16, 64, 100))
    assert sum(b >= r for b in default_grid(1024, 64)[0] for r in default_grid(1024, 64)[1]) == 42
    with pytest.raises(ValueError):
        default_grid(0, 4)


@given(st.integers(1, 5000), st.integers(1, 1000))
def test_default_grid_property(max_tokens: int, max_seqs: int) -> None:
    batch, requests = default_grid(max_tokens, max_seqs)
    assert list(batch) == sorted(set(batch)) and batch[-1] == max_tokens
    assert list(requests) == sorted(set(requests)) and requests[-1] == min(max_seqs, max_tokens)
    ThroughputProfile(batch, requests, tuple((1.0,) * len(requests) for _ in batch))  # a valid grid


def test_profile_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = {"model": "/m/smollm2.gguf", "dtype": "bf16", "device": "cpu", "max_num_seqs": 64}
    path = profile_cache_path(key, tmp_path)
    assert path.parent == tmp_path and path.suffix == ".json"
    assert profile_cache_path(dict(reversed(list(key.items()))), tmp_path) == path  # order-free
    assert profile_cache_path({**key, "dtype": "fp32"}, tmp_path) != path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert profile_cache_path(key).parent == tmp_path / "sparkserve" / "profiles"


# ---- online drift correction ---------------------------------------------------------------------


def max_relative_error(online: OnlineProfile, factor: float) -> float:
    base = online.base
    return max(
        abs(online.step_time(b, r) / (factor * base.step_time(b, r)) - 1)
        for b in base.batch_tokens
        for r in base.num_requests
    )


def test_online_profile_unchanged_without_drift() -> None:
    base = ThroughputProfile.load(PROFILE_PATH)
    online = OnlineProfile(base)
    for b, r in [(64, 16), (8, 1), (300, 64)] * 10:
        online.observe(b, r, base.step_time(b, r))
    assert max_relative_error(online, 1.0) < 1e-9 and online.scale == pytest.approx(1.0)


@pytest.mark.parametrize("point", [(64, 16), (50, 10)])  # a grid cell and an off-grid point
def test_online_profile_reflects_2x_slowdown_within_10_steps(point) -> None:
    """Stated convergence: global log error |log 2| * 0.75^n -> within 4% after 10 steps, at every
    cell of the grid (observed or not); not yet after 5 steps."""
    base = ThroughputProfile.load(PROFILE_PATH)
    online = OnlineProfile(base)
    for step in range(1, 11):
        online.observe(*point, 2.0 * base.step_time(*point))
        if step == 5:
            assert max_relative_error(online, 2.0) > 0.1
    assert max_relative_error(online, 2.0) < 0.04
    assert online.scale == pytest.approx(2.0 ** (1 - 0.75**10))
    for _ in range(200):  # the residual transient dies out
        online.observe(*point, 2.0 * base.step_time(*point))
    assert max_relative_error(online, 2.0) < 0.01


def test_online_profile_noisy_slowdown() -> None:
    base = ThroughputProfile.load(PROFILE_PATH)
    online = OnlineProfile(base)
    rng = np.random.default_rng(0)
    points = [(64, 16), (128, 32), (16, 4), (256, 64)]
    for step in range(40):
        b, r = points[step % len(points)]
        online.observe(b, r, 2.0 * base.step_time(b, r) * math.exp(rng.normal(0, 0.05)))
    assert max_relative_error(online, 2.0) < 0.1


def test_online_profile_follows_a_stale_profile_all_the_way(caplog: pytest.LogCaptureFixture) -> None:
    """A cached profile 20x too slow (measured on a loaded machine): the per-step clip bounds each move
    of the global scale, not how far it goes, so the prediction ends at the served speed; the
    contradiction is logged once. A profile off by 1.5x (within the factor 2) is not."""
    base = ThroughputProfile.load(PROFILE_PATH)
    online = OnlineProfile(base)
    with caplog.at_level(logging.WARNING, logger="sparkserve.scheduler.profile.online"):
        for step in range(1, 81):
            online.observe(8, 1, base.step_time(8, 1) / 20)
            if step == 3:
                assert online.scale > 0.3  # three steps move it by at most 4^(0.25 * 3)
        assert online.step_time(8, 1) / base.step_time(8, 1) == pytest.approx(1 / 20, rel=0.02)
        assert max_relative_error(online, 1 / 20) < 0.05
    assert sum("contradicted" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    online = OnlineProfile(base)
    with caplog.at_level(logging.WARNING, logger="sparkserve.scheduler.profile.online"):
        for _ in range(80):
            online.observe(8, 1, base.step_time(8, 1) * 1.5)
    assert not any("contradicted" in r.getMessage() for r in caplog.records)


def test_online_profile_clips_outliers_and_learns_shape() -> None:
    base = ThroughputProfile.load(PROFILE_PATH)
    online = OnlineProfile(base)
    online.observe(64, 16, 100 * base.step_time(64, 16))  # one stall
    assert online.scale == pytest.approx(4.0**0.25)
    # Persistent shape error: the largest cell runs 1.5x slower, the smallest as profiled. (Residuals
    # are local and the corrected grid is kept monotone, so a cell is never predicted faster than a
    # smaller step next to it that carries only the global scale: hence the corner cells here.)
    online = OnlineProfile(base)
    big, small = (512, 64), (1, 1)
    for _ in range(300):
        online.observe(*big, 1.5 * base.step_time(*big))
        online.observe(*small, base.step_time(*small))
    assert online.step_time(*big) / base.step_time(*big) == pytest.approx(1.5, rel=0.06)
    assert online.step_time(*small) / base.step_time(*small) == pytest.approx(1.0, rel=0.06)
    assert is_monotone(online.current.step_time_s)
    with pytest.raises(ValueError, match="> 0 seconds"):
        online.observe(1, 1, 0.0)


def test_profile_follows_the_staircase_of_served_buckets() -> None:
    """Graph-served steps cost their padded bucket's time: with the buckets, the grid holds every bucket
    edge b and b + 1 on both axes, and the measured profile reproduces the staircase at every R (without
    them R = 20 would interpolate between 16 and 64)."""
    buckets = (1, 2, 4, 8, 16, 32, 48, 64)

    def bucket_time(num_requests: int) -> float:
        return 1e-3 * next(b for b in buckets if b >= num_requests)

    batch, requests = default_grid(256, 64, buckets)
    assert {16, 17, 32, 33, 48, 49, 64} <= set(batch) & set(requests) and 65 not in requests
    profile = measure_profile(lambda b, r: bucket_time(r), batch, requests, repeats=1, warmup=0)
    for n in range(1, 65):
        assert profile.step_time(n, n) == pytest.approx(bucket_time(n)), n
    assert default_grid(512, 64, ()) == default_grid(512, 64)
