"""The first start's cut profile (issue 22): its grid, the cells it times, how it fills the rest, and that it
tracks the full grid where the step time is as smooth as the cut assumes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.scheduler.profile import default_grid, measure_profile
from sparkserve.scheduler.profile.measure import CUT_SLOW_CELL_S, measured_cells


def test_cut_grid_stops_below_the_budget() -> None:
    assert default_grid(1024, 64, cut=True) == ((1, 2, 4, 8, 16, 32, 64, 128, 256, 512), (1, 2, 4, 16, 64))
    assert default_grid(1000, 64, cut=True)[0][-1] == 512
    assert default_grid(2, 2, cut=True) == default_grid(2, 2)  # too small a grid to cut
    assert default_grid(64, 8, (4,), cut=True) == ((1, 2, 4, 5, 8, 16, 32), (1, 2, 4, 5, 8))  # bucket edges stay


def test_cut_cells_keep_the_ends_of_rows_above_the_largest_r() -> None:
    batch, requests = default_grid(1024, 64, cut=True)
    cells = measured_cells(batch, requests, cut=True)
    assert [(b, r) for b, r in cells if b > 64] == [(128, 1), (128, 64), (256, 1), (256, 64), (512, 1), (512, 64)]
    assert [(b, r) for b, r in cells if b <= 64] == [(b, r) for b in batch if b <= 64 for r in requests if r <= b]
    full = measured_cells(*default_grid(1024, 64))
    assert len(full) == 42 and len(cells) == 28
    assert measured_cells(batch, requests) == [(b, r) for b in batch for r in requests if b >= r]


def _smooth_step(b: int, r: int) -> float:
    """A step time affine in R at fixed B and convex in B (a weight read, per-token work, a drafter per request)."""
    return 0.01 + 0.002 * b + 1e-6 * b * b + 0.003 * r


def test_cut_profile_times_only_its_cells_and_interpolates_the_rest() -> None:
    calls: list[tuple[int, int]] = []

    def step(b: int, r: int) -> float:
        calls.append((b, r))
        return _smooth_step(b, r)

    batch, requests = default_grid(1024, 64, cut=True)
    profile = measure_profile(step, batch, requests, repeats=2, warmup=1, cut=True)
    cells = measured_cells(batch, requests, cut=True)
    assert sorted(set(calls)) == sorted(cells)
    for b, r in cells:  # slow cells (>= CUT_SLOW_CELL_S at the first call) are that one call, others 1 + 2
        assert calls.count((b, r)) == (1 if _smooth_step(b, r) >= CUT_SLOW_CELL_S else 3)
    for i, b in enumerate(batch):  # affine in R: the interpolated points are exact
        for k, r in enumerate(requests):
            if b >= r:
                assert abs(profile.step_time_s[i][k] - _smooth_step(b, r)) < 1e-12
    full = measure_profile(_smooth_step, *default_grid(1024, 64), repeats=1, warmup=0)
    # beyond the cut grid (B = 1024) the profile extrapolates its steepest last segment: within 15 % here
    for r in requests:
        assert abs(profile.step_time(1024, r) / full.step_time(1024, r) - 1) < 0.15


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 512))
def test_cut_grid_is_a_valid_profile_grid(max_tokens: int, max_seqs: int) -> None:
    batch, requests = default_grid(max_tokens, max_seqs, cut=True)
    cells = measured_cells(batch, requests, cut=True)
    assert set(cells) <= {(b, r) for b in batch for r in requests if b >= r}
    assert {b for b, _ in cells} == set(batch)  # every row is timed at least once
    profile = measure_profile(lambda b, r: 1e-3 * (b + r), batch, requests, repeats=1, warmup=0, cut=True)
    assert profile.batch_tokens == batch and profile.num_requests == requests
