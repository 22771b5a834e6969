"""Fused vs eager decode step (kernels/fused_cpu.py) on the CPU, and where a step's time goes.

One engine per (dtype, threads); its requests decode in steady steps while the model's ``fused_step`` flips
between the two arms every ``--steps`` steps, for ``--rounds`` rounds (A/B alternating inside one run: a
shared machine's drift hits both arms). Per arm: median step time (``EngineCore.step``), median target
forward, and the time inside the linears (every ``quant_linear`` call of the model, the LM head included,
timed with perf_counter); ``outside_linears_share = (forward - linears in forward) / forward`` is the per-op
overhead the issue asks to bring from about half the step to <= 20 % at batch 1::

    python -m sparkserve.benchmarks.bench_fused_step --batch 1 4 --threads 1 2 --out bench_results/fused_step.json

``--clock cpu`` times with the calling thread's CPU time (``time.thread_time``) instead of the wall clock: with
one torch thread every op runs on that thread, so a loaded machine's preemptions drop out of every figure.

Writes JSON with the machine (CPU model, SIMD flags, ATen level, load average) and per cell the medians in
milliseconds and the eager / fused ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import PROMPTS, machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.models import llama
from sparkserve.scheduler.sampling_params import SamplingParams


class LinearTimer:
    """Wraps ``llama.quant_linear`` (the model's every linear call) and sums its seconds on ``clock``."""

    def __init__(self, clock=time.perf_counter) -> None:  # noqa: ANN001
        self.seconds = 0.0
        self.real = llama.quant_linear
        self.clock = clock

    def __call__(self, *args):  # noqa: ANN002, ANN204
        start = self.clock()
        try:
            return self.real(*args)
        finally:
            self.seconds += self.clock() - start


def measure(core: EngineCore, fused: bool, steps: int, linears: LinearTimer) -> list[dict[str, float]]:
    """``steps`` decode steps with the fused step on or off; per step seconds of step, forward, linears."""
    model = core.runner.model
    model.fused_step = fused
    real_forward = model.forward
    forward_s = [0.0, 0.0]  # this step's forward seconds, linear seconds inside it

    clock = linears.clock

    def timed_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        before, start = linears.seconds, clock()
        out = real_forward(*args, **kwargs)
        forward_s[0] += clock() - start
        forward_s[1] += linears.seconds - before
        return out

    model.forward = timed_forward
    rows = []
    for _ in range(steps):
        forward_s[:] = [0.0, 0.0]
        start, linears.seconds = clock(), 0.0
        core.step()
        rows.append({"step": clock() - start, "forward": forward_s[0], "linears_in_forward": forward_s[1],
                     "linears": linears.seconds})
    del model.forward
    return rows


def run_cell(core: EngineCore, batch: int, steps: int, rounds: int, linears: LinearTimer) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=steps * rounds * 2 + 16, ignore_eos=True)
    tok = core.tokenizer
    for i in range(batch):
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]))
        core.add_request(core.make_request(f"b{batch}-{i}-{time.monotonic_ns()}", prompt, params))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or core.scheduler.num_waiting:
        core.step()  # prefill (and the first decode step) before timing
    arms: dict[str, list[dict[str, float]]] = {"eager": [], "fused": []}
    for _ in range(rounds):
        for arm in ("eager", "fused"):
            arms[arm] += measure(core, arm == "fused", steps, linears)[1:]  # the first step after a flip warms up
    core.runner.model.fused_step = True
    while core.has_unfinished_requests():
        core.step()
    cell: dict = {"batch": batch}
    for arm, rows in arms.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        forward = med["forward"]
        cell[arm] = {**{f"{k}_ms": round(1000 * v, 3) for k, v in med.items()}, "num_steps": len(rows),
                     "outside_linears_share": round((forward - med["linears_in_forward"]) / forward, 3)}
    cell["step_speedup"] = round(cell["eager"]["step_ms"] / cell["fused"]["step_ms"], 3)
    cell["forward_speedup"] = round(cell["eager"]["forward_ms"] / cell["fused"]["forward_ms"], 3)
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"])
    parser.add_argument("--steps", type=int, default=8, help="steps per arm per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: the calling thread's CPU time (one thread: load-proof)")
    parser.add_argument("--out", required=True)
    ns = parser.parse_args()
    linears = LinearTimer(time.thread_time if ns.clock == "cpu" else time.perf_counter)
    llama.quant_linear = linears
    results = []
    for dtype in ns.dtype:
        for threads in ns.threads:
            torch.set_num_threads(threads)
            core = EngineCore(EngineArgs(drafter="none", dtype=dtype, num_threads=threads, max_num_seqs=max(ns.batch)))
            for batch in ns.batch:
                cell = {"dtype": dtype, "threads": threads, **run_cell(core, batch, ns.steps, ns.rounds, linears)}
                print(json.dumps(cell), flush=True)
                results.append(cell)
    out = {"machine": machine(), "clock": ns.clock, "steps_per_arm": ns.steps, "rounds": ns.rounds,
           "results": results}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
