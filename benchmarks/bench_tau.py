"""Accepted length tau per prompt set and drafter (issue "Speculation that pays without more training").

Through ``EngineCore`` (no HTTP), ``fixed:K`` verification (every draft position verified, so tau measures the
drafter, not the policy), all prompts of a set decoding at once, stop tokens honoured. For each set x
``--speculative-method`` x temperature: tau (tokens per verify step, bonus included), acceptance by position,
and realised / predicted accepted drafts, where the prediction is the prefix survival ``prod_{i<=k} c_i`` of
the drafter's stated confidences; ``online_calibration`` gives the online calibration's own account
(accepted over stated and over corrected conditional confidences, cumulative over the run).

    python -m sparkserve.benchmarks.bench_tau --num-prompts 12 --max-tokens 128 --out bench_results/tau_by_set.json

Sets: mt_bench, humaneval, gsm8k and ``spec_bench:CATEGORY`` (translation, summarization, qa,
math_reasoning, rag). tau does not depend on machine speed, so a loaded machine gives the same figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.benchmarks.survival_check import step_and_record_survival
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.loadtests.prompts import load_prompts
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import SpecDecodingStats
from sparkserve.train.data import chat_prompt_ids

DEFAULT_SETS = ["mt_bench", "humaneval", "gsm8k", "spec_bench:translation", "spec_bench:summarization",
                "spec_bench:qa", "spec_bench:math_reasoning", "spec_bench:rag"]


def run_set(core: EngineCore, prompts: list[list[int]], temperature: float, max_tokens: int) -> dict:
    """Decode ``prompts`` at once; tau, acceptance by position, realised / predicted accepted drafts."""
    stops = tuple(core.tokenizer.stop_token_ids)
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=i, stop_token_ids=stops)
        core.add_request(core.make_request(f"r{i}", p, params))
    gamma = core.num_speculative_tokens
    pred, real, count = [0.0] * gamma, [0] * gamma, [0] * gamma
    records = []
    output_tokens = 0
    start = time.perf_counter()
    while core.has_unfinished_requests():
        for out in step_and_record_survival(core, pred, real, count):
            output_tokens += len(out.new_token_ids)
        if core.last_step is not None:
            records.append(core.last_step.scheduler.spec_decoding)
    stats = SpecDecodingStats.merge(gamma, records)
    rows = core.controller.stats().calibration if core.controller is not None else ()
    online = {}
    if rows:  # the online calibration's own account (conditional per-position survival, cumulative)
        accepted = sum(r.accepted for r in rows)
        online = {"realised_over_stated": round(accepted / max(sum(r.stated for r in rows), 1e-9), 3),
                  "realised_over_corrected": round(accepted / max(sum(r.corrected for r in rows), 1e-9), 3)}
    return {
        "tau": round(stats.accepted_length, 3), "verify_steps": stats.num_drafts,
        "draft_tokens": stats.num_draft_tokens, "accepted_tokens": stats.num_accepted_tokens,
        "output_tokens": output_tokens, "wall_s": round(time.perf_counter() - start, 1),
        "by_drafter": {r.drafter: {"verify_steps": r.num_drafts, "drafts": r.num_draft_tokens,
                                   "accepted": r.num_accepted_tokens,
                                   "tau": round(1 + r.num_accepted_tokens / max(r.num_drafts, 1), 3)}
                       for r in stats.per_drafter},
        "acceptance_by_position": [round(real[k] / count[k], 3) if count[k] else None for k in range(gamma)],
        "realised_over_predicted": round(sum(real) / max(sum(pred), 1e-9), 3),
        "online_calibration": online,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=DEFAULT_SETS)
    ap.add_argument("--methods", nargs="+", default=["dspark", "suffix", "hybrid"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0])
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=7, help="fixed:K verification")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    loaded = load_model(None, dtype=torch.bfloat16)
    results = []
    out_path = Path(ns.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for name in ns.sets:
        prompts = [chat_prompt_ids(loaded.tokenizer, t) for t in load_prompts(name)[: ns.num_prompts]]
        for temp in ns.temperatures:
            for method in ns.methods:
                args = EngineArgs(verify_policy=f"fixed:{ns.gamma}", speculative_method=method,
                                  max_num_seqs=max(16, len(prompts)), max_num_batched_tokens=2048)
                core = EngineCore(args, loaded=loaded)
                row = {"set": name, "method": method, "temperature": temp,
                       **run_set(core, prompts, temp, ns.max_tokens)}
                print(json.dumps(row), flush=True)
                results.append(row)
                out_path.write_text(json.dumps({"machine": machine(), "config": vars(ns), "results": results},
                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
