"""One user (c = 1): a speculating engine against ``--drafter none``, in-process, alternated per prompt.

Used for issue 23's end-to-end report: the effect of the int4 path the CPU plan picks on speculation at one
user. The speculating engine is the default DSpark drafter with a fixed verify length (``fixed:3``, guard off),
so the kernel's verify cost, not the policy, decides the ratio. The int4 path follows the environment
(``SPARKSERVE_INT4_ACTIVATIONS=int8`` lets the plan pick the int8-dot kernel; docs/kernels.md).

    python -m sparkserve.benchmarks.bench_spec_c1 --out bench_results/spec_c1_int4_exact.json
    SPARKSERVE_INT4_ACTIVATIONS=int8 python -m sparkserve.benchmarks.bench_spec_c1 \\
        --out bench_results/spec_c1_int4_int8dot.json

Output: JSON with the machine, the environment, per prompt and repetition the wall seconds of both engines
and their ratio (plain / speculating = speculating's tok/s over plain's: both emit the same token count),
and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from sparkserve.benchmarks.bench_guard import prompt_set
from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="mtbench+gsm8k")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--verify-policy", default="fixed:3")
    ap.add_argument("--out", default="bench_results/spec_c1.json")
    args = ap.parse_args(argv)
    spec = EngineCore(EngineArgs(verify_policy=args.verify_policy, spec_guard=False, max_num_seqs=4))
    plain = EngineCore(EngineArgs(drafter="none", max_num_seqs=4))
    tok = plain.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]))
               for t in prompt_set(args.sets, args.num_prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for rep in range(args.repetitions):
        for i, prompt in enumerate(prompts):
            row: dict = {"repetition": rep, "prompt": i}
            order = (("spec", spec), ("plain", plain))
            for name, core in order if (rep + i) % 2 == 0 else order[::-1]:  # alternate who runs first
                start = time.perf_counter()
                core.generate_batch([prompt], params)
                row[f"{name}_wall_s"] = time.perf_counter() - start
            row["ratio_tok_s"] = row["plain_wall_s"] / row["spec_wall_s"]
            rows.append(row)
    result = {"machine": machine(), "args": vars(args),
              "env": {k: v for k, v in os.environ.items() if k.startswith("SPARKSERVE_INT4")},
              "median_ratio_tok_s": statistics.median(r["ratio_tok_s"] for r in rows), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("env", "median_ratio_tok_s")}))


if __name__ == "__main__":
    main()
