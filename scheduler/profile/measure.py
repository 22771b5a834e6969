"""Measuring a throughput profile at start-up, its default grid and its on-disk cache.

Pure orchestration: the engine supplies ``step_fn(B, R)``, which runs one real step (target forward
over B batch tokens with R decode requests, plus the drafter for those R requests) and returns its
wall time in seconds. Nothing here touches a tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from sparkserve.scheduler.profile.grid import ProfileKey, ThroughputProfile


def default_grid(max_num_batched_tokens: int, max_num_seqs: int, buckets: Sequence[int] = (), cut: bool = False
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (B, R) grid to profile: few cells, since step time is smooth in log B and in R and the
    profile's monotone fit interpolates between them (the online profile corrects the rest while serving).

    B: powers of two up to and including ``max_num_batched_tokens``; R: 1, 2, 4, then powers of four
    up to and including ``max_num_seqs``, capped at ``max_num_batched_tokens`` (every decode request
    needs one token). For 1024 x 64: 11 x 5 points, 42 cells with B >= R (the earlier grid with 1.5x
    midpoints and every power of two in R had 19 x 7, 108 cells).

    ``buckets``: the padded batch sizes a decode / verify step is served at (CUDA graphs,
    ``engine/step_graph.py``), whose step time is a staircase in R (n requests cost what their bucket
    costs). Each bucket b and b + 1 then join both axes, so the decode cells B = R exist and the
    interpolation is flat between b + 1 and the next bucket: the profile follows the staircase.

    ``cut`` (a first start's grid, issue 22): the B grid stops below ``max_num_batched_tokens`` (at its
    largest power of two below it, when the grid has three B points or more): the largest steps cost as much
    as the rest of the grid together on a 2-core machine, and beyond its grid the profile extrapolates along
    its steepest last segment (``ThroughputProfile.step_time``), which the online profile corrects.
    """
    if max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
    batch = {max_num_batched_tokens}
    power = 1
    while power < max_num_batched_tokens:
        batch.add(power)
        power *= 2
    max_r = min(max_num_seqs, max_num_batched_tokens)
    requests = {max_r}
    power = 1
    while power < max_r:
        requests.add(power)
        power *= 2 if power < 4 else 4
    edges = {e for b in buckets for e in (b, b + 1) if e <= max_r}
    if cut and len(batch) >= 3:
        batch.discard(max_num_batched_tokens)
    return tuple(sorted(batch | edges)), tuple(sorted(requests | edges))


CUT_SLOW_CELL_S = 0.1
"""A cut profile's ``slow_cell_s``: a cell whose first call takes 0.1 s or more is that one call."""


def measured_cells(batch_grid: Sequence[int], request_grid: Sequence[int], cut: bool = False) -> list[tuple[int, int]]:
    """The (B, R) cells ``measure_profile`` times, in order (B, then R): every cell with B >= R; with ``cut``,
    the rows with B above the largest R only at their smallest and largest R (the R points between are
    interpolated linearly: at such B the step's R-dependent parts, the drafter and the LM head rows, grow
    about linearly in R)."""
    top_r = request_grid[-1]
    cells = []
    for b in batch_grid:
        row = [r for r in request_grid if r <= b]
        if cut and b > top_r and len(row) > 2:
            row = [row[0], row[-1]]
        cells += [(b, r) for r in row]
    return cells


def _fill_between(row: list[float | None], request_grid: Sequence[int]) -> None:
    """Linear interpolation in R of the ``None`` points between a row's measured ones (in place)."""
    known = [k for k, v in enumerate(row) if v is not None]
    for lo, hi in zip(known, known[1:], strict=False):
        for k in range(lo + 1, hi):
            t = (request_grid[k] - request_grid[lo]) / (request_grid[hi] - request_grid[lo])
            row[k] = (1 - t) * row[lo] + t * row[hi]  # type: ignore[operator]


def time_cell(fn: Callable[[], float], repeats: int, warmup: int, slow_cell_s: float) -> float:
    """Seconds of one grid cell: ``warmup`` untimed calls then the median of ``repeats`` calls, except
    that a cell whose first warm-up call took ``slow_cell_s`` or more is that one call (a large step:
    its relative noise is small, and one call of it costs as much as many small cells)."""
    for i in range(warmup):
        first = float(fn())
        if i == 0 and first >= slow_cell_s:
            return first
    return statistics.median(float(fn()) for _ in range(repeats))


def measure_profile(
    step_fn: Callable[[int, int], float],
    batch_grid: Sequence[int],
    request_grid: Sequence[int],
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = False,
    key: ProfileKey | None = None,
    draft_fn: Callable[..., float] | None = None,
    slow_cell_s: float = 0.25,
    cut: bool = False,
) -> ThroughputProfile:
    """Time ``step_fn(B, R)`` on every grid cell with B >= R and build a smoothed profile.

    ``draft_fn(R, sampled)`` (seconds of the drafter forward alone for R greedy / sampled requests, the
    part of a step that the scheduler can skip) is timed the same way on every R of the grid, as
    ``draft_time_s`` and ``draft_time_sampled_s``.

    Each cell is timed by :func:`time_cell` (``warmup`` untimed calls, the median of ``repeats``; a cell
    whose first call takes ``slow_cell_s`` or more is that one call). Cells with B < R (impossible steps)
    take the first measured value above them in their column, and the grid is then made monotone
    (``smooth_monotone``). ``progress`` shows a tqdm bar over the cells and the drafter timings.

    ``cut`` (a first start, issue 22: plan and profile in <= 90 s on a 2-core machine): only
    ``measured_cells(..., cut=True)`` are timed, the R points between a row's ends interpolated linearly, and
    ``slow_cell_s`` is at most ``CUT_SLOW_CELL_S``; pair it with ``default_grid(..., cut=True)``. The online
    profile (scheduler/profile/online.py) corrects what the cut misses while serving; docs/benchmarks.md has
    the cut's measured error against the full grid.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    batch_grid, request_grid = tuple(batch_grid), tuple(request_grid)
    if not batch_grid or not request_grid or request_grid[0] > batch_grid[-1]:
        raise ValueError("the grid needs at least one cell with B >= R")
    cells = measured_cells(batch_grid, request_grid, cut)
    if cut:
        slow_cell_s = min(slow_cell_s, CUT_SLOW_CELL_S)
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(cells) + (2 * len(request_grid) if draft_fn is not None else 0)
        bar = tqdm(total=total, desc="profiling SPS(B, R)", unit="cell")
    measured: dict[tuple[int, int], float] = {}
    for b, r in cells:
        measured[(b, r)] = time_cell(lambda b=b, r=r: step_fn(b, r), repeats, warmup, slow_cell_s)
        if bar is not None:
            bar.update(1)
    draft_times: dict[bool, list[float]] = {}
    if draft_fn is not None:
        for sampled in (False, True):
            draft_times[sampled] = []
            for r in request_grid:
                draft_times[sampled].append(
                    time_cell(lambda r=r, s=sampled: draft_fn(r, s), repeats, warmup, slow_cell_s))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    grid = [[measured.get((b, r)) for r in request_grid] for b in batch_grid]
    for row in grid:
        _fill_between(row, request_grid)
    for k in range(len(request_grid)):
        first = next((row[k] for row in grid if row[k] is not None), None)
        for row in grid:
            if row[k] is not None:
                break
            row[k] = first
    # Columns with R beyond every B (only if request_grid exceeds batch_grid) copy their left neighbour.
    for row in grid:
        for k in range(len(request_grid)):
            if row[k] is None:
                row[k] = row[k - 1]
    return ThroughputProfile.from_measurements(  # type: ignore[arg-type]
        batch_grid, request_grid, grid, key, draft_times.get(False), draft_times.get(True)
    )


def profile_cache_path(key: ProfileKey, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/<sha256 of the canonical key JSON, 16 hex>.json``.

    The default folder is ``$XDG_CACHE_HOME/sparkserve/profiles`` (``~/.cache/sparkserve/profiles``).
    The key should name everything the timings depend on: model path, dtype, device, drafter,
    gamma, max_num_batched_tokens, max_num_seqs, the grid, torch version.
    """
    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache_dir = base / "sparkserve" / "profiles"
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}.json"
