"""Host cost of the DSpark drafter's block metadata per drafting step: host-built vs device-built (CPU).

The drafter's forward needs the attention metadata of R bidirectional blocks of gamma tokens at positions
known only on the device (anchors after verification). This times, per R (``--context`` context rows,
16-token blocks, gamma ``--gamma``), the two ways ``Speculator.propose`` gets it eagerly:
- host: ``build_attention_metadata`` from the host block-table lists and the device starts (on a GPU: about
  13 small host-to-device copies, the path before issue 26's drafter work);
- device: ``draft_graph.table_tensor`` (the host tables staged with the step's one copy) and
  ``draft_graph.block_attention_metadata`` (device ops only).
On the CPU both run on the host, so this measures host work only (the copies a GPU would add are not here).
Rounds alternate the two paths (the machine is shared); medians of ``--repeats`` calls per round.

    python -m sparkserve.benchmarks.bench_draft_graph --out bench_results/draft_block_metadata.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.benchmarks.bench_step_graph import _median_call
from sparkserve.engine.attention import build_attention_metadata
from sparkserve.engine.spec_decode.draft_graph import block_attention_metadata, table_tensor

BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    per_row = -(-ns.context // BLOCK) + 2  # own blocks + scratch blocks (Speculator.draft_tables)
    gamma, bound = ns.gamma, ns.context + ns.gamma
    results = []
    for rows in ns.rows:
        tables = [list(range(r * per_row, (r + 1) * per_row)) for r in range(rows)]
        starts = torch.full((rows,), ns.context, dtype=torch.int64)  # [R] (on the device when served)

        def host(tables: list[list[int]] = tables, starts: torch.Tensor = starts, rows: int = rows) -> object:
            return build_attention_metadata([gamma] * rows, starts, starts + gamma, tables, BLOCK,
                                            causal=[False] * rows, max_kv_len=bound)

        def device(tables: list[list[int]] = tables, starts: torch.Tensor = starts) -> object:
            return block_attention_metadata(starts, table_tensor(tables), gamma, BLOCK, bound)

        host(), device()  # warm-up
        times: dict[str, list[float]] = {"host": [], "device": []}
        for _ in range(ns.rounds):
            times["host"].append(_median_call(host, ns.repeats))
            times["device"].append(_median_call(device, ns.repeats))
        host_s, device_s = statistics.median(times["host"]), statistics.median(times["device"])
        results.append({"rows": rows, "host_us": 1e6 * host_s, "device_us": 1e6 * device_s,
                        "host_over_device": host_s / device_s, "rounds_s": times})
        print(f"R={rows:4d}: host-built {1e6 * host_s:8.1f} us  device-built {1e6 * device_s:8.1f} us  "
              f"ratio {host_s / device_s:.2f}", flush=True)
    result = {"context": ns.context, "gamma": gamma, "block_size": BLOCK, "rounds": ns.rounds, "repeats": ns.repeats,
              "rows": results, "machine": machine()}
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
