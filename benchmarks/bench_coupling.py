"""Acceptance at T = 1: Gumbel-max coupling vs standard rejection sampling, through the engine (no HTTP).

Three settings on the same prompts, shipped DSpark drafter, ``fixed:7`` (every draft verified, so
acceptance is measured at every position), one engine per setting:
- ``rejection``: unseeded requests, rejection sampling (accept with probability min(1, p/q));
- ``coupled-seeded``: seeded requests, verified by agreement of the drafter's and the target's
  Gumbel-max choices under shared keyed noise;
- ``coupled-unseeded``: unseeded requests verified by coupling too (``--unseeded-coupling``).
Rejection sampling accepts with probability sum_v min(p, q)(v), the most any coupling can; Gumbel-max
coupling agrees less often but makes a seeded request's text independent of verify lengths.

    python -m sparkserve.benchmarks.bench_coupling --num-prompts 20 --max-tokens 128 --out bench_results/coupling_T1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.engine.outputs import StepStats
from sparkserve.loadtests.prompts import load_prompts
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import SpecDecodingStats
from sparkserve.train.data import chat_prompt_ids

SETTINGS = {"rejection": (False, False), "coupled-seeded": (True, False), "coupled-unseeded": (False, True)}


def run(loaded, prompts: list[list[int]], setting: str, temperature: float, max_tokens: int) -> dict:
    """Decode all prompts at once under one setting; returns tau and per-position acceptance."""
    seeded, unseeded_coupling = SETTINGS[setting]
    args = EngineArgs(verify_policy="fixed:7", max_num_seqs=len(prompts), unseeded_coupling=unseeded_coupling)
    core = EngineCore(args, loaded=loaded)
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                             seed=1000 + i if seeded else None) for i in range(len(prompts))]
    start = time.perf_counter()
    steps: list[StepStats] = []
    core.generate_batch(prompts, params, request_prefix=setting, steps=steps)
    s = SpecDecodingStats.merge(core.num_speculative_tokens, (step.scheduler.spec_decoding for step in steps))
    return {"setting": setting, "temperature": temperature, "tau": round(s.accepted_length, 4),
            "verify_steps": s.num_drafts, "accepted_drafts": s.num_accepted_tokens,
            "acceptance_by_position": [round(a / v, 4) if v else None
                                       for a, v in zip(s.num_accepted_per_pos, s.num_verified_per_pos, strict=True)],
            "wall_s": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=20, help="half MT-bench, half GSM8K first turns")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_model(None, dtype=torch.bfloat16)
    half = ns.num_prompts // 2
    texts = load_prompts("mt_bench")[:half] + load_prompts("gsm8k")[: ns.num_prompts - half]
    prompts = [chat_prompt_ids(loaded.tokenizer, t) for t in texts]
    results = []
    for setting in ns.settings:
        results.append(run(loaded, prompts, setting, ns.temperature, ns.max_tokens))
        print(json.dumps(results[-1]), flush=True)
    out = {"machine": machine(), "num_prompts": ns.num_prompts, "max_tokens": ns.max_tokens, "policy": "fixed:7",
           "drafter": "shipped DSpark (draft vocabulary 8192)", "results": results}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
