"""Predicted vs realised accepted drafts through the engine: are the confidences the policy ranks by
calibrated on the slots it actually verifies?

For every verified draft position k of every decode request-step, the prediction is the prefix
survival ``prod_{i<=k} c_i`` from the drafter's confidences (what Algorithm 1 sums into E), the outcome
whether draft k was accepted. Runs 16 MT-bench / GSM8K prompts at once through ``EngineCore`` (no HTTP)
for each policy and temperature, with the cached start-up profile (or ``--profile``).

    python -m sparkserve.benchmarks.survival_check --policies dspark fixed:7 --temperatures 0 1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Sequence

import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.loadtests.prompts import load_prompts
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import DraftOutcome
from sparkserve.train.data import chat_prompt_ids


def record_survival(confidences: Sequence[float], draft: DraftOutcome, pred: list[float], real: list[int],
                    count: list[int]) -> None:
    """Add one verify step's prediction (prefix survival ``prod_{i<=k} c_i`` per verified position k) and
    outcome (draft k accepted) to the per-position sums ``pred`` / ``real`` / ``count`` (in place)."""
    survival = 1.0
    for k in range(min(draft.num_draft_tokens, len(confidences))):
        survival *= confidences[k]
        pred[k] += survival
        real[k] += draft.num_accepted_tokens > k
        count[k] += 1


def step_and_record_survival(core: EngineCore, pred: list[float], real: list[int], count: list[int]) -> list:
    """One ``core.step()`` whose verify steps (the step's stats record) go into the per-position sums
    with the confidences the drafts were proposed with. Returns the step's outputs."""
    confidences = {r.request_id: r.drafts.confidences for r in core.scheduler.running_requests}
    outputs = core.step()
    spec = core.last_step.scheduler.spec_decoding if core.last_step is not None else None
    for draft in spec.drafts if spec is not None else ():
        record_survival(confidences.get(draft.request_id, ()), draft, pred, real, count)
    return outputs


def run(core: EngineCore, prompts: list[list[int]], temperature: float, max_tokens: int) -> dict:
    """Decode all prompts at once; returns predicted / realised accepted drafts overall and by position."""
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=i)
        core.add_request(core.make_request(f"r{i}", p, params))
    gamma = core.num_speculative_tokens
    pred, real, count = [0.0] * gamma, [0] * gamma, [0] * gamma
    while core.has_unfinished_requests():
        step_and_record_survival(core, pred, real, count)
    return {"verified": sum(count), "predicted_accepted": round(sum(pred), 1), "realised_accepted": sum(real),
            "ratio": round(sum(real) / max(sum(pred), 1e-9), 3),
            "by_position": [{"k": k, "n": count[k], "predicted": round(pred[k] / count[k], 3),
                             "realised": round(real[k] / count[k], 3)} for k in range(gamma) if count[k]]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=["dspark", "fixed:7"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--profile", default=None, help="profile JSON (default: the newest cached one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    profile = args.profile or max(glob.glob(os.path.expanduser("~/.cache/sparkserve/profiles/*.json")),
                                  key=os.path.getmtime)
    torch.set_num_threads(2)
    loaded = load_model(None, dtype=torch.bfloat16)
    texts = [p for pair in zip(load_prompts("mt_bench"), load_prompts("gsm8k"), strict=False) for p in pair]
    prompts = [chat_prompt_ids(loaded.tokenizer, t) for t in texts[: args.num_prompts]]
    results = []
    for temp in args.temperatures:
        for policy in args.policies:
            core = EngineCore(EngineArgs(verify_policy=policy, profile_path=profile, max_num_seqs=64), loaded=loaded)
            res = {"policy": policy, "temperature": temp, **run(core, prompts, temp, args.max_tokens)}
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args) | {"profile": profile}, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
