"""Cost of ``--batch-invariant`` (issue 24): decode tok/s at concurrency c, the mode on against off.

The model is the default server's (the embedded SmolLM2-135M Q4_1 GGUF, ``--dtype``, GGUF int4 blocks
kept in bf16), loaded once and shared by both arms; each arm is an engine over it. One run is ``c``
requests of ``--max-tokens`` output tokens each (``ignore_eos``, distinct prompts, admitted together),
tok/s = output tokens / wall seconds. Arms alternate (off, on, off, on ...) so load from other processes
hits both alike; the result is the ratio of the median tok/s, per c, and of the best (each arm's fastest round:
on a shared machine the least disturbed one, so the ratio of the best is the steadier estimate there)::

    python -m sparkserve.benchmarks.bench_batch_invariant --out bench_results/batch_invariant.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.cpu_plan import cpu_signature
from sparkserve.engine.loader import default_model_path, load_model
from sparkserve.scheduler.sampling_params import SamplingParams


def tokens_per_second(core: EngineCore, concurrency: int, max_tokens: int, round_id: int) -> float:
    """Output tok/s of ``concurrency`` requests admitted together (distinct 40-token prompts)."""
    prompts = [[(31 * i + 7 * j + 11 * round_id) % 20000 + 100 for j in range(40)] for i in range(concurrency)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = core.generate_batch(prompts, params, request_prefix=f"r{round_id}")
    return sum(len(o) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    dtype = getattr(torch, ns.dtype)
    loaded = load_model(default_model_path(), dtype=dtype, quantization="auto" if ns.dtype == "bfloat16" else "none")
    cores = {mode: EngineCore(EngineArgs(dtype=ns.dtype, drafter="none", num_kv_blocks=512, max_num_seqs=32,
                                         enable_prefix_caching=False, cpu_plan=False, batch_invariant=mode),
                              loaded=loaded) for mode in (False, True)}
    results = {}
    for c in ns.concurrency:
        for core in cores.values():  # warm-up
            tokens_per_second(core, c, 4, -1)
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(ns.rounds):
            for mode, core in cores.items():
                runs["on" if mode else "off"].append(tokens_per_second(core, c, ns.max_tokens, r))
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        best = max(runs["on"]) / max(runs["off"])
        results[f"c={c}"] = {"tok_s_off": runs["off"], "tok_s_on": runs["on"], "median_off": off, "median_on": on,
                             "on_over_off": on / off, "cost_pct": 100 * (1 - on / off),
                             "best_on_over_off": best, "best_cost_pct": 100 * (1 - best)}
        print(f"c={c}: off {off:.1f} tok/s, on {on:.1f} tok/s, on/off {on / off:.3f} (best rounds {best:.3f})",
              flush=True)
        report = {"benchmark": "bench_batch_invariant", "load_avg_end": list(os.getloadavg()), "dtype": ns.dtype, "max_tokens": ns.max_tokens,
                  "rounds": ns.rounds, "drafter": "none",
                  "machine": {**machine(), "signature": cpu_signature().key()}, "results": results}
        if ns.out is not None:  # after each concurrency: a cut-off run keeps what it measured
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            ns.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
