"""Engine step time breakdown (no HTTP): scheduling, input metadata, target forward, drafter forward,
LM head + verify / sample, update; at a given number of concurrent decode requests.

The timers wrap public seams that every version of the engine has (``Scheduler.schedule``,
``ModelRunner.execute``, the target's ``forward``, the drafter's ``propose``,
``Scheduler.update_from_output``), so the same script measures an older checkout for a before / after
comparison (run it with that checkout first on ``PYTHONPATH``)::

    python -m sparkserve.benchmarks.bench_step_breakdown --batch 1 16 64 --out bench_results/step_breakdown.json
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_step_breakdown.py --label before ...

Only steady decode steps count (every scheduled request decoding, none prefilling). Times are medians
over the measured steps, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.sampling_params import SamplingParams

PROMPTS = ["Explain how a bicycle works.", "Write a short story about a dragon.", "What is photosynthesis?",
           "List ten animals and describe each briefly.", "How do computers store numbers?",
           "Describe the water cycle.", "Why is the sky blue?", "Give advice for learning to cook."]


class Timers:
    """Accumulates per-step phase durations (seconds) from wrapped calls."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.execute_start = 0.0
        self.forward_seen = False

    def wrap(self, obj, name: str, phase: str, on_start=None):
        real = getattr(obj, name)

        def timed(*args, **kwargs):
            if on_start is not None:
                on_start()
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - start

        setattr(obj, name, timed)


def instrument(core: EngineCore) -> Timers:
    timers = Timers()
    runner = core.runner

    def forward_start() -> None:
        if not timers.forward_seen:
            timers.forward_seen = True
            timers.current["metadata"] += time.perf_counter() - timers.execute_start

    def execute_start() -> None:
        timers.execute_start = time.perf_counter()
        timers.forward_seen = False

    timers.wrap(core.scheduler, "schedule", "schedule")
    timers.wrap(core.scheduler, "update_from_output", "update")
    timers.wrap(runner, "execute", "execute", on_start=execute_start)
    timers.wrap(runner.model, "forward", "target_forward", on_start=forward_start)
    if runner.speculator is not None:
        timers.wrap(runner.speculator.drafter, "propose", "drafter_forward")
    return timers


def run(core: EngineCore, batch: int, max_tokens: int, tokenizer, tag: str = "") -> dict:
    timers = instrument(core)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        text = PROMPTS[i % len(PROMPTS)] + f" ({i})"
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        core.add_request(core.make_request(f"{tag}b{batch}-{i}", prompt, params))
    while core.has_unfinished_requests():
        timers.current = defaultdict(float)
        start = time.perf_counter()
        core.step()
        total = time.perf_counter() - start
        last = core.last_step.scheduler if core.last_step is not None else None
        steady = last is not None and last.num_decode_requests == batch and last.num_batched_tokens >= batch and core.scheduler.num_waiting == 0
        prefilling = any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running)
        if steady and not prefilling:
            step = dict(timers.current)
            step["total"] = total
            step["verify_and_lm_head"] = step.get("execute", 0.0) - step.get("metadata", 0.0) - step.get(
                "target_forward", 0.0) - step.get("drafter_forward", 0.0)
            timers.steps.append(step)
    phases = ("schedule", "metadata", "target_forward", "drafter_forward", "verify_and_lm_head", "update", "total")
    steps = timers.steps[2:]  # skip the first steady steps (warm caches)
    result = {p: round(1000 * statistics.median(s.get(p, 0.0) for s in steps), 3) for p in phases}
    result["overhead"] = round(result["total"] - result["target_forward"] - result["drafter_forward"], 3)
    result["overhead_share"] = round(result["overhead"] / result["total"], 3) if result["total"] else None
    result["num_steps"] = len(steps)
    return result


# SIMD flags a CPU result depends on (the int4 kernels' AVX-512 paths need bw / vl / vnni beside avx512f)
BENCH_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine() -> dict:
    """The machine a result was measured on: CPU model, its SIMD flags (``BENCH_ISA_FLAGS`` present), ATen's
    dispatch level, cores, torch threads and version, load average."""
    from sparkserve.engine.cpu_plan import cpu_signature

    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        present = set(line.split(":", 1)[-1].split())
        flags = [f for f in BENCH_ISA_FLAGS if f in present]
    sig = cpu_signature()
    return {"cpu": sig.model, "cpu_flags": flags, "aten_capability": sig.capability, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg": os.getloadavg()}


def engine_args(config: str, max_batch: int) -> EngineArgs:
    """EngineArgs of a ``--configs`` entry: ``none`` (no drafter), ``off`` (the DSpark drafter loaded, its
    context fed, nobody drafting: verify policy none), or a verify policy; ``+eager`` feeds the drafter's
    context every step (``lazy_drafter_context=False``)."""
    name, _, option = config.partition("+")
    return EngineArgs(drafter="none" if name == "none" else None,
                      verify_policy={"none": None, "off": "none"}.get(name, name), max_num_seqs=max_batch,
                      max_num_batched_tokens=max(1024, 8 * max_batch), lazy_drafter_context=option != "eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--configs", nargs="+", default=["none", "fixed:3"],
                        help="'none' (no drafter), 'off' (drafter loaded, nobody drafts) or a verify policy; "
                             "'+eager' feeds the drafter's context every step")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternation (configs in turn per batch)")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", required=True)
    ns = parser.parse_args()
    torch.set_num_threads(2)
    results = []
    cores = {config: EngineCore(engine_args(config, max(ns.batch))) for config in ns.configs}
    for rnd in range(ns.rounds):
        for batch in ns.batch:
            for config, core in cores.items():  # configs alternate at each batch size (drift hits both)
                row = {"label": ns.label, "round": rnd, "config": config, "batch": batch,
                       **run(core, batch, ns.max_tokens, core.tokenizer, f"r{rnd}")}
                print(json.dumps(row), flush=True)
                results.append(row)
    out = {"machine": machine(), "max_tokens": ns.max_tokens, "results": results}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
