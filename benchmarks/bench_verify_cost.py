"""The verify step's cost at one user: a step of 1 + 7 tokens (``--verify-policy fixed:7``, DSpark drafter, guard
off) against a decode step (``--drafter none``), both on the default engine (CPU plan, fused CPU step),
in-process, broken down by part (issue 23's engine-level goal: verify <= 1.5x decode).

Both engines are built in one process and serve the same prompt in turns (``--rounds``), so background load
on a shared machine hits them alike. Every steady step (one request, no prefill: 8 scheduled tokens for the
verify engine, 1 for the decode engine) is timed whole; the parts come from timers wrapped around the
engine's seams, each part counted exclusive of the parts nested in it:

- ``linears``: the target's decoder linears (``quant_linear`` in engine/models/llama.py);
- ``attention``: RoPE + KV store + paged attention (``fused_cpu.rope_store_attend``);
- ``norms_silu``: the other fused layer ops (``fused_cpu.add_rms_norm``, ``fused_cpu.silu_mul``);
- ``forward_other``: the rest of the target forward (embedding, Python between the ops);
- ``lm_head``: ``compute_logits`` over the step's sampled rows (1 or 8);
- ``verify``: the Verifier (greedy agreement, bonus / recovered token);
- ``drafter_context``: the drafter's context feed (``Speculator.feed_step``);
- ``drafter_forward``: drafting the next block (``ModelRunner._draft``) less its parts ``drafter_backbone``
  (the DSpark layers), ``drafter_lm_head`` (its base logits over the block with the target's head,
  ``base_logits``) and ``drafter_sampling`` (Markov head, sampling, confidences: ``sample_block``);
- ``runner_other``: the rest of ``ModelRunner.execute`` (persistent batch, inputs, host transfer);
- ``schedule`` / ``update``: the scheduler's two calls; ``step_other``: the rest of ``EngineCore.step``.

``--clock cpu`` (with one thread) reads the engine thread's CPU time instead of the wall clock: what a step
costs a core, which other jobs on a shared machine disturb far less.

Each round alternates an instrumented pass (the breakdown; the timers cost about 1 us per wrapped call) and a
plain pass (timers off: the step medians and the ratio). Output: JSON with the machine, per engine the
median step and part times (ms) and the verify / decode ratios.

    python -m sparkserve.benchmarks.bench_verify_cost --rounds 3 --out bench_results/int4c_verify_cost.json
    python -m sparkserve.benchmarks.bench_verify_cost --clock cpu --threads 1 --out bench_results/int4c_verify_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.models import llama
from sparkserve.kernels import fused_cpu
from sparkserve.scheduler.sampling_params import SamplingParams

PROMPT = "Write a short story about a dragon who learns to cook."
ENGINES = {"verify": {"verify_policy": "fixed:7", "spec_guard": False}, "decode": {"drafter": "none"}}
ROWS = {"verify": 8, "decode": 1}  # scheduled tokens of a steady step
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: this thread's CPU seconds
clock = time.perf_counter


class Parts:
    """Exclusive seconds per part of the current step: a stack of open parts; a part's time excludes its
    nested parts'."""

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [name, start, nested seconds]

    def wrap(self, owner: object, attr: str, part: str | Callable[[list[str]], str]) -> None:
        """Replace ``owner.attr`` by a timed call; ``part`` may depend on the open parts' names."""
        real = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return real(*args, **kwargs)
            name = part if isinstance(part, str) else part([p[0] for p in self.stack])
            self.stack.append([name, clock(), 0.0])
            try:
                return real(*args, **kwargs)
            finally:
                name, start, nested = self.stack.pop()
                elapsed = clock() - start
                self.totals[name] += elapsed - nested
                if self.stack:
                    self.stack[-1][2] += elapsed

        setattr(owner, attr, timed)


def _nested(part: str) -> Callable[[list[str]], str]:
    """``part``, or the enclosing LM head / drafter part when called inside one (their linears and ops)."""
    def name(open_parts: list[str]) -> str:
        return next((p for p in reversed(open_parts) if p == "lm_head" or p.startswith("drafter")), part)
    return name


def instrument(core: EngineCore, parts: Parts) -> None:
    """Wrap the seams of ``core`` (module-level kernels once per process: see :func:`instrument_modules`)."""
    runner = core.runner
    parts.wrap(core, "step", "step_other")
    parts.wrap(core.scheduler, "schedule", "schedule")
    parts.wrap(core.scheduler, "update_from_output", "update")
    parts.wrap(runner, "execute", "runner_other")
    parts.wrap(runner.model, "forward", "forward_other")
    parts.wrap(runner.model, "compute_logits", "lm_head")
    parts.wrap(runner.verifier, "verify", "verify")
    if runner.speculator is not None:
        parts.wrap(runner.speculator, "feed_step", "drafter_context")
        parts.wrap(runner, "_draft", "drafter_forward")
        inner = getattr(runner.speculator.drafter, "dspark", runner.speculator.drafter)
        for attr, part in (("backbone", "drafter_backbone"), ("base_logits", "drafter_lm_head"),
                           ("sample_block", "drafter_sampling")):
            if hasattr(inner, attr):
                parts.wrap(inner, attr, part)


def instrument_modules(parts: Parts) -> None:
    """The target's linears and fused layer ops (names looked up at call time in engine/models/llama.py)."""
    parts.wrap(llama, "quant_linear", _nested("linears"))
    parts.wrap(fused_cpu, "rope_store_attend", _nested("attention"))
    parts.wrap(fused_cpu, "add_rms_norm", _nested("norms_silu"))
    parts.wrap(fused_cpu, "silu_mul", _nested("norms_silu"))


def serve_once(core: EngineCore, rows: int, parts: Parts, tag: str, max_tokens: int) -> list[dict[str, float]]:
    """One request to completion; per steady step its wall seconds and, when ``parts`` is on, its parts."""
    tok = core.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    core.add_request(core.make_request(tag, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                   ignore_eos=True)))
    steps = []
    while core.has_unfinished_requests():
        parts.totals = defaultdict(float)
        start = clock()
        core.step()
        total = clock() - start
        if core.last_step is not None and core.last_step.scheduler.num_batched_tokens == rows:
            steps.append({"total": total, **parts.totals})
    return steps[2:]  # the first steady steps warm caches


def summarize(plain: list[dict[str, float]], timed: list[dict[str, float]]) -> dict[str, Any]:
    """Median ms: the plain steps' total, the instrumented steps' total and parts."""
    names = sorted({k for s in timed for k in s} - {"total"})
    ms = lambda values: round(1e3 * statistics.median(values), 3)  # noqa: E731
    return {"step_ms": ms([s["total"] for s in plain]), "steps": len(plain),
            "instrumented_step_ms": ms([s["total"] for s in timed]),
            "parts_ms": {n: ms([s.get(n, 0.0) for s in timed]) for n in names}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: the engine thread's CPU time (use with --threads 1: other threads' work is not seen)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="bench_results/int4c_verify_cost.json")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (the OpenMP workers' time is not the calling thread's)")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    parts = Parts()
    instrument_modules(parts)
    cores = {name: EngineCore(EngineArgs(max_num_seqs=4, **kw)) for name, kw in ENGINES.items()}
    for core in cores.values():
        instrument(core, parts)
    plain: dict[str, list] = {n: [] for n in cores}
    timed: dict[str, list] = {n: [] for n in cores}
    for rnd in range(args.rounds):
        for name, core in (cores.items() if rnd % 2 == 0 else reversed(cores.items())):
            for enabled in (False, True):  # plain then instrumented, back to back on one engine
                parts.enabled = enabled
                (timed if enabled else plain)[name] += serve_once(core, ROWS[name], parts, f"r{rnd}{enabled}",
                                                                  args.max_tokens)
    result: dict[str, Any] = {"machine": machine(), "note": args.note, "args": vars(args),
                              "plan": cores["decode"].plan.summary() if cores["decode"].plan else None,
                              "engines": {n: summarize(plain[n], timed[n]) for n in cores}}
    v, d = result["engines"]["verify"], result["engines"]["decode"]
    result["ratio_verify_to_decode"] = round(v["step_ms"] / d["step_ms"], 3)
    result["parts_delta_ms"] = {n: round(v["parts_ms"].get(n, 0.0) - d["parts_ms"].get(n, 0.0), 3)
                                for n in v["parts_ms"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_verify_to_decode", "parts_delta_ms")}))
    print(json.dumps(result["engines"], indent=1))


if __name__ == "__main__":
    main()
