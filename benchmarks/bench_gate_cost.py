"""The drafting gate's host cost per step: ``plan_drafting`` with the early exit against the full search (issue 25).

The gate runs every step for every decode request, drafting or not. On a monotone profile (every
``ThroughputProfile``; ``dspark_planner.monotone_profile``) its search stops once no remaining slot can beat
the best Theta; an opaque wrapper of the same profile makes it search every one of the R x gamma slots.
Both must choose the same requests (checked here on every cell, and by a property test). The time is the
calling thread's CPU time (``time.thread_time``), which another process on the same cores inflates much less
than wall time: pure host Python, no torch.

    python -m sparkserve.benchmarks.bench_gate_cost --profile ~/.cache/sparkserve/profiles/KEY.json \\
        --out bench_results/spec3_gate_cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.scheduler.policy import VerifyRequest, plan_drafting
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.profile.online import OnlineProfile


class Opaque:
    """The same times as ``profile``, but not a ``ThroughputProfile``: the gate searches every slot."""

    has_draft_time = True

    def __init__(self, profile: OnlineProfile) -> None:
        self.step_time, self.draft_time = profile.step_time, profile.draft_time


def gate_us(requests: list[VerifyRequest], profile: object, calls: int) -> tuple[float, list[bool]]:
    """Thread CPU microseconds per ``plan_drafting`` call, and its choice."""
    start = time.thread_time()
    for _ in range(calls):
        flags = plan_drafting(requests, profile, 0, 8192)  # type: ignore[arg-type]
    return (time.thread_time() - start) / calls * 1e6, flags


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="a start-up profile with drafter times (JSON)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.2, 0.6], help="mean stated confidence")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default="bench_results/gate_cost.json")
    args = ap.parse_args(argv)
    base = ThroughputProfile.load(args.profile)
    if not base.has_draft_time:
        raise SystemExit(f"{args.profile} has no drafter times: the gate would not run")
    online = OnlineProfile(base)
    rng = random.Random(0)
    cells = []
    for r in args.concurrency:
        for conf in args.confidence:
            reqs = [VerifyRequest(tuple(min(1.0, conf * rng.uniform(0.5, 1.5)) for _ in range(args.gamma)), args.gamma)
                    for _ in range(r)]
            early, flags = gate_us(reqs, online, args.calls)
            full, full_flags = gate_us(reqs, Opaque(online), args.calls)
            assert flags == full_flags, "the early exit changed the gate's choice"
            cell = {"concurrency": r, "confidence": conf, "early_exit_us": early, "full_search_us": full,
                    "num_drafting": sum(flags)}
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
