"""The CPU plan's per-bucket timings and choice for a model on this machine (issue 22), as JSON naming the CPU.

Times the model's decoder-layer linears (engine/cpu_plan_measure.py: every candidate alternating within a
bucket, far-slower ones pruned at larger buckets) in fp32 and bf16 for dense and the int4 paths, then
selects the plan as ``--dtype auto`` would. Run it again under ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` to see the choice an AVX2-only CPU gets (``--label avx2``).

    python -m sparkserve.benchmarks.bench_cpu_plan --out bench_results/cpu_plan.json --label native
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sparkserve.engine.cpu_plan import candidate_paths, cpu_signature, row_buckets, select_plan
from sparkserve.engine.cpu_plan_measure import linear_shapes, measure_timings, read_model_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: the embedded model)")
    parser.add_argument("--max-rows", type=int, default=1024, help="largest bucket (the step's token budget)")
    parser.add_argument("--label", required=True, help="name of this run in the JSON")
    parser.add_argument("--out", required=True, help="JSON file; runs are merged in under their label")
    ns = parser.parse_args(argv)
    config, gguf = read_model_config(ns.model)
    buckets = row_buckets(ns.max_rows)
    dtypes = ("float32", "bfloat16")
    candidates = [(d, p) for d in dtypes for p in candidate_paths("int4" if gguf else "none", d, gguf)]
    start = time.perf_counter()
    timings = measure_timings(linear_shapes(config), buckets, candidates, progress=True)
    seconds = time.perf_counter() - start
    plan = select_plan(timings, buckets, dtypes, tuple(dict.fromkeys(p for _, p in candidates)))
    print(plan.table())
    sig = cpu_signature()
    out = Path(ns.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    data["runs"][ns.label] = {
        "cpu": {"model": sig.model, "flags": list(sig.flags), "capability": sig.capability},
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
        "shapes_n_k_calls": [list(s) for s in linear_shapes(config)], "plan_seconds": round(seconds, 2),
        "plan": plan.summary(), "quant_max_rows": plan.quant_max_rows,
        "ms_per_forward_linears": {f"{d} {p} M={m}": round(t * 1e3, 3) for (d, p, m), t in sorted(timings.items())},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
