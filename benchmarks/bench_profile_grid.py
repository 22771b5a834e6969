"""The start-up SPS(B, R) profile, full and cut (issue 22: first start <= 90 s): time and accuracy, one run.

One engine as ``sparkserve serve`` builds it (default model, drafter and budgets); then the profile is measured
once per ``--arms`` entry, in order (``full``: every cell of the full grid, as ``sparkserve profile`` and the
first start before the cut measure it; ``cut``: the first start's grid and cells now), on the same engine.
Every timed call is recorded (B, R, seconds), so other cuts can be evaluated offline on the full arm's calls.
The accuracy of each cut arm is its profile's prediction ``step_time(B, R)`` against the full arm's smoothed
value at every measured cell of the full grid (B >= R): relative error median / 90th percentile / max; two
full arms give the run-to-run spread to read it against::

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SPARKSERVE_INT4_ISA=avx2 \\
        python -m sparkserve.benchmarks.bench_profile_grid --arms cut full cut --out bench_results/profile_cut_avx2.json

Writes JSON naming the machine (CPU model, SIMD flags, ATen level, load average before and after).

``--replay FILE`` measures nothing: it replays the recorded calls of FILE's full arms through the cut, once as
recorded (the cut's fewer repetitions included) and once with every call of a cell returning the value the full
run kept for it (the cut's grid and interpolation alone, free of the run's noise), and prints both errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.throughput_probe import probe_timers
from sparkserve.scheduler.profile import ThroughputProfile, default_grid, measure_profile
from sparkserve.scheduler.profile.measure import time_cell


def recorded(fn, calls: list[list]):  # noqa: ANN001, ANN201
    """``fn`` that appends ``[*args, seconds]`` of every call to ``calls``."""

    def call(*args):  # noqa: ANN002, ANN202
        seconds = fn(*args)
        calls.append([*args, round(seconds, 6)])
        return seconds

    return call


def prediction_error(profile: ThroughputProfile, reference: ThroughputProfile) -> dict[str, float]:
    """Relative error ``|profile - reference| / reference`` of step time over the reference's cells with B >= R."""
    errors = [abs(profile.step_time(b, r) / reference.step_time_s[i][k] - 1)
              for i, b in enumerate(reference.batch_tokens) for k, r in enumerate(reference.num_requests) if b >= r]
    errors.sort()
    return {"median": round(statistics.median(errors), 4), "p90": round(errors[int(0.9 * (len(errors) - 1))], 4),
            "max": round(errors[-1], 4), "cells": len(errors)}


def _calls(rows: list[list]) -> dict[tuple, list[float]]:
    """Recorded ``[*args, seconds]`` rows -> {args: [seconds, ...]} in call order."""
    calls: dict[tuple, list[float]] = defaultdict(list)
    for *key, seconds in rows:
        calls[tuple(key)].append(seconds)
    return calls


def _replayed(calls: dict[tuple, list[float]], kept: dict[tuple, float] | None) -> Callable[..., float]:
    """``fn(*args)``: the recorded calls of args in order (``kept`` None), else the kept value of args."""
    iters = {key: iter(v) for key, v in calls.items()}
    return (lambda *k: next(iters[k])) if kept is None else (lambda *k: kept[k])


def _kept(calls: dict[tuple, list[float]]) -> dict[tuple, float]:
    """The value ``measure_profile`` kept for each cell of a full run (``time_cell`` over its recorded calls)."""
    return {k: time_cell(functools.partial(_replayed({k: v}, None), *k), 2, 1, 0.25) for k, v in calls.items()}


def replay(arm: dict) -> dict[str, dict[str, float]]:
    """The cut profile rebuilt from a full arm's recorded calls, its error against that arm's profile: ``as_recorded``
    (the same calls in order) and ``structure`` (each cell's kept value: grid and interpolation alone)."""
    steps, drafts = _calls(arm["step_calls"]), _calls(arm["draft_calls"])
    full = ThroughputProfile.from_dict(arm["profile"])
    grid = default_grid(int(full.batch_tokens[-1]), int(full.num_requests[-1]), cut=True)
    out = {}
    for name in ("as_recorded", "structure"):
        kept = _kept(steps) if name == "structure" else None
        draft_kept = _kept(drafts) if name == "structure" else None
        cut = measure_profile(_replayed(steps, kept), *grid, repeats=2, warmup=1, cut=True,
                              draft_fn=_replayed(drafts, draft_kept) if drafts else None)
        out[name] = prediction_error(cut, full)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", choices=("full", "cut"), default=["cut", "full", "cut"])
    parser.add_argument("--label", default="run")
    parser.add_argument("--out", default=None, help="JSON to write (required unless --replay)")
    parser.add_argument("--replay", default=None, help="a bench_profile_grid JSON: replay its full arms' calls")
    ns = parser.parse_args()
    if ns.replay is not None:
        doc = json.loads(Path(ns.replay).read_text())
        print(json.dumps([replay(arm) for arm in doc["arms"] if arm["arm"] == "full"], indent=1))
        return
    if ns.out is None:
        parser.error("--out is required")
    load_before = os.getloadavg()
    start = time.perf_counter()
    args = EngineArgs()
    core = EngineCore(dataclasses.replace(args, verify_policy="none"))
    build_s = time.perf_counter() - start
    arms = []
    try:
        timers = probe_timers(core.runner, core.num_blocks)
        for arm in ns.arms:
            step_calls: list[list] = []
            draft_calls: list[list] = []
            draft = recorded(timers.draft, draft_calls) if timers.draft is not None else None
            batch_grid, request_grid = default_grid(args.max_num_batched_tokens, args.max_num_seqs, cut=arm == "cut")
            start = time.perf_counter()
            profile = measure_profile(recorded(timers.step, step_calls), batch_grid, request_grid, repeats=2,
                                      warmup=1, draft_fn=draft, cut=arm == "cut")
            seconds = time.perf_counter() - start
            arms.append({"arm": arm, "seconds": round(seconds, 2), "profile": profile.to_dict(),
                         "step_calls": step_calls, "draft_calls": draft_calls})
            print(json.dumps({"arm": arm, "seconds": round(seconds, 2), "calls": len(step_calls) + len(draft_calls)}),
                  flush=True)
    finally:
        core.close()
    profiles = [ThroughputProfile.from_dict(a["profile"]) for a in arms]
    fulls = [p for a, p in zip(arms, profiles, strict=True) if a["arm"] == "full"]
    accuracy = []
    for ref_index, ref in enumerate(fulls):
        for a, p in zip(arms, profiles, strict=True):
            if p is not ref:
                accuracy.append({"reference": f"full#{ref_index}", "arm": a["arm"], "seconds": a["seconds"],
                                 "relative_error": prediction_error(p, ref)})
    doc = {"benchmark": "start-up SPS(B, R) profile: full vs cut (bench_profile_grid)", "label": ns.label,
           "machine": {**machine(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "SPARKSERVE_INT4_ISA")
                   if k in os.environ},
           "engine_build_s": round(build_s, 2),
           "accuracy": accuracy, "arms": arms}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(accuracy, indent=1))


if __name__ == "__main__":
    main()
