"""Prefill cost against prompt length through the engine (no HTTP): one request of N prompt tokens,
``max_tokens`` 1, the wall time of its steps (chunked prefill under ``--max-num-batched-tokens``) and
prompt tokens per second; lengths alternate in rounds so machine drift hits them alike.

    python -m sparkserve.benchmarks.bench_prefill --lengths 500 1000 2000 4000 --rounds 2 --out bench_results/prefill.json

Goal (issue "Per-user speed on one stream"): tokens/s of a 4,000-token prompt within 1.5x of a 500-token
one (attention cost per query token linear in its context; no quadratic masks or workspaces).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.loadtests.prompts import load_prompts
from sparkserve.scheduler.sampling_params import SamplingParams


def prompt_of(tokenizer, num_tokens: int) -> list[int]:
    """``num_tokens`` token ids of real text (MT-bench questions concatenated)."""
    text = " ".join(load_prompts("mt_bench"))
    ids = tokenizer.encode(text)
    while len(ids) < num_tokens:
        ids = ids + ids
    return ids[:num_tokens]


def time_prefill(core: EngineCore, prompt: list[int], request_id: str) -> float:
    core.add_request(core.make_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1)))
    start = time.perf_counter()
    while core.has_unfinished_requests():
        core.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    torch.set_num_threads(2)
    core = EngineCore(EngineArgs(drafter="none", max_num_batched_tokens=ns.max_num_batched_tokens,
                                 enable_prefix_caching=False))
    prompts = {n: prompt_of(core.tokenizer, n) for n in ns.lengths}
    time_prefill(core, prompts[min(ns.lengths)], "warmup")
    seconds: dict[int, list[float]] = {n: [] for n in ns.lengths}
    for r in range(ns.rounds):
        for n in ns.lengths:
            seconds[n].append(time_prefill(core, prompts[n], f"p{n}-{r}"))
            print(json.dumps({"tokens": n, "round": r, "seconds": round(seconds[n][-1], 3)}), flush=True)
    rows = [{"prompt_tokens": n, "median_s": round(statistics.median(s), 3),
             "tokens_per_s": round(n / statistics.median(s), 1), "runs_s": [round(x, 3) for x in s]}
            for n, s in seconds.items()]
    shortest, longest = rows[0], rows[-1]
    out = {"machine": machine(), "max_num_batched_tokens": ns.max_num_batched_tokens, "results": rows,
           "throughput_ratio_shortest_over_longest": round(shortest["tokens_per_s"] / longest["tokens_per_s"], 3)}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["results"]), out["throughput_ratio_shortest_over_longest"])


if __name__ == "__main__":
    main()
