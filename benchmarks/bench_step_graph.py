"""Host cost of preparing one decode step: eager metadata vs the step graph's static buffers (CPU).

With CUDA graphs the GPU work of a decode step shrinks to one replay, so the host's preparation of the step
bounds small-batch speed. This times, per batch size B (SmolLM2-135M's heads: Hkv = 3, G = 3; context
``--context`` tokens, 16-token blocks), the two host paths of ``InputBatch.prepare`` for a decode step:
- eager: ``build_step_metadata`` (the Triton kernels' metadata) + the one staged copy (``HostStaging.to_device``,
  packing on);
- graph: ``StepGraph.stage``: the host-padded step copied into its bucket's static buffers (one copy).
Rounds alternate the two paths (the machine is shared); medians of ``--repeats`` calls per round.

    python -m sparkserve.benchmarks.bench_step_graph --out bench_results/step_graph_host_prep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.attention import build_step_metadata, new_kv_cache
from sparkserve.engine.cpu_plan import cpu_signature
from sparkserve.engine.staging import HostStaging
from sparkserve.engine.step_graph import StepGraph, default_buckets
from sparkserve.testing.tiny import tiny_target

HEADS = (3, 3)  # SmolLM2-135M: Hkv = 3, G = 9 / 3
BLOCK = 16


def _median_call(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    max_blocks = ns.context // BLOCK + 2
    target = tiny_target(seed=0, head_dim=16)
    caches = [new_kv_cache(1, BLOCK, HEADS[0], 16, torch.float32)]  # host staging only: no forward runs
    graph = StepGraph(target.model, caches, HEADS, BLOCK, max_blocks, scratch_block=0,
                      buckets=default_buckets(max(ns.batch)), staging=HostStaging(torch.device("cpu")))
    staging = HostStaging(torch.device("cpu"), pack_on_cpu=True)
    rows = []
    for batch in ns.batch:
        tables = torch.arange(batch * max_blocks, dtype=torch.int64).view(batch, max_blocks)  # [B, max_blocks]
        positions = torch.full((batch,), ns.context, dtype=torch.int64)  # [B]
        ids = torch.arange(batch, dtype=torch.int64)
        kv_lens = [ns.context + 1] * batch
        step = graph.step(graph.key_for([1] * batch))

        def eager(batch: int = batch, tables: torch.Tensor = tables, ids: torch.Tensor = ids,
                  positions: torch.Tensor = positions, kv_lens: list[int] = kv_lens) -> object:
            meta = build_step_metadata([1] * batch, [ns.context] * batch, kv_lens, tables, BLOCK, "cpu", HEADS,
                                       num_sms=132)
            return staging.to_device((ids, positions, meta))

        def staged(step=step, tables=tables, ids=ids, positions=positions, kv_lens=kv_lens) -> object:  # noqa: ANN001
            return graph.stage(step, ids, positions, tables, kv_lens)

        eager(), staged()  # warm-up
        times: dict[str, list[float]] = {"eager": [], "graph": []}
        for _ in range(ns.rounds):
            times["eager"].append(_median_call(eager, ns.repeats))
            times["graph"].append(_median_call(staged, ns.repeats))
        eager_s, graph_s = statistics.median(times["eager"]), statistics.median(times["graph"])
        rows.append({"batch": batch, "bucket": step.key.rows, "eager_us": 1e6 * eager_s, "graph_us": 1e6 * graph_s,
                     "eager_over_graph": eager_s / graph_s, "rounds_s": times})
        print(f"B={batch:4d} (bucket {step.key.rows}): eager {1e6 * eager_s:8.1f} us  graph {1e6 * graph_s:8.1f} us  "
              f"ratio {eager_s / graph_s:.2f}", flush=True)
    result = {"context": ns.context, "block_size": BLOCK, "heads": HEADS, "rounds": ns.rounds, "repeats": ns.repeats,
              "rows": rows, "machine": {**machine(), "signature": cpu_signature().key()}}
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
