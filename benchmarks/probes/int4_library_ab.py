"""Two builds of the int4 extension, A / B, on one thread's CPU clock: the exact kernel (``int4_mm``) per shape
and row count, each library in its own child process (one op namespace per process), A and B alternated
``--rounds`` times; per cell the minimum over rounds of the minimum of 7 samples (us). For a kernel change
that must not change bits (compare outputs with the tests) but should change speed.

    python -m sparkserve.benchmarks.probes.int4_library_ab --a OLD.so --b NEW.so --out bench_results/x.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"qkv_proj": (960, 576, 1), "gate_up_proj": (3072, 576, 1), "down_proj": (576, 1536, 1),
          "lm_head_q8_0": (49152, 576, 2)}
ROWS = (1, 4, 6, 8, 12, 16)


def child(library: str) -> dict[str, float]:
    """us per call (min of 7 samples) of every (shape, rows) with ``library`` loaded, one thread, bf16."""
    import torch

    from sparkserve.kernels import int4_cpu
    from sparkserve.testing.int4_blocks import random_block

    torch.ops.load_library(library)
    torch.set_num_threads(1)
    out = {}
    for name, (n, k, planes) in SHAPES.items():
        block = random_block(n, k, planes)
        w = int4_cpu.repack_int4(block.codes, block.scales, block.zeros, torch.bfloat16)
        calls = 2 if planes == 2 else 20
        for m in ROWS:
            x = torch.randn(m, k).to(torch.bfloat16)
            best = float("inf")
            for _ in range(7):
                start = time.thread_time()
                for _ in range(calls):
                    torch.ops.sparkserve_int4.int4_mm(x, w.codes, w.scales, w.zeros, n, torch.bfloat16, -1, 16)
                best = min(best, (time.thread_time() - start) / calls * 1e6)
            out[f"{name}/{m}"] = round(best, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench_results/int4_library_ab.json")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return
    from sparkserve.benchmarks.bench_step_breakdown import machine

    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for rnd in range(args.rounds):
        for side in ("a", "b") if rnd % 2 == 0 else ("b", "a"):
            cmd = [sys.executable, "-m", "sparkserve.benchmarks.probes.int4_library_ab", "--a", args.a, "--b", args.b,
                   "--child", getattr(args, side)]
            runs[side].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    best = {side: {cell: min(r[cell] for r in rs) for cell in rs[0]} for side, rs in runs.items()}
    result = {"machine": machine(), "clock": "cpu, one thread", "libraries": {"a": args.a, "b": args.b},
              "us": best, "b_over_a": {cell: round(best["b"][cell] / best["a"][cell], 3) for cell in best["a"]},
              "rounds": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["b_over_a"]))


if __name__ == "__main__":
    main()
