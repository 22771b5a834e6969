"""What the lazy feed's catch-up window costs in acceptance (issue 25; engine/spec_decode/context_feed.py).

A request that drafts again after ``n`` rows without drafting gets only its latest ``window`` pending rows
projected into the drafter's context; older ones stay unwritten in the drafter's cache (stale rows). That is
lossless (the target verifies every draft) but may lower acceptance. This bench measures it: the embedded
target and DSpark drafter, ``fixed:K`` verification, and a seeded gate that lets each request draft with
probability ``p`` per step (the same decisions for every window, since the gate's generator is seeded per
run and outputs are greedy, hence identical). For each (p, window) it reports drafts verified, accepted and
the acceptance rate per draft position. Acceptance counts do not depend on timing, so the machine's load
does not matter; ``p = 1`` (drafting every step) leaves nothing pending and must give the same counts for
every window.

    python -m sparkserve.benchmarks.bench_context_window --draft-prob 1.0 0.1 --window 4 16 64 1000000 \\
        --out bench_results/spec3_context_window.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sparkserve.benchmarks.bench_guard import prompt_set
from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import LoadedModel
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import SpecDecodingStats


def run(loaded: LoadedModel, prompts: list[list[int]], window: int, draft_prob: float, max_tokens: int,
        verify_policy: str, num_kv_blocks: int) -> dict:
    """One engine at ``window``: greedy outputs and the run's drafting counts."""
    core = EngineCore(EngineArgs(seed=0, max_num_seqs=len(prompts), verify_policy=verify_policy,
                                 num_kv_blocks=num_kv_blocks), loaded)
    feed = core.runner.speculator.feed
    assert feed is not None, "the lazy feed is off"
    feed.window = window
    rng = random.Random(0)
    core.controller.select_drafting = lambda requests, context: [rng.random() < draft_prob for _ in requests]
    steps: list = []
    outputs = core.generate_batch(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                  steps=steps)
    gamma = core.runner.speculator.gamma
    stats = SpecDecodingStats.merge(gamma, (s.scheduler.spec_decoding for s in steps))
    return {"window": window, "draft_prob": draft_prob, "num_draft_tokens": stats.num_draft_tokens,
            "num_accepted_tokens": stats.num_accepted_tokens,
            "acceptance_rate": stats.num_accepted_tokens / max(stats.num_draft_tokens, 1),
            "accepted_per_pos": [a / max(v, 1) for a, v in zip(stats.num_accepted_per_pos,
                                                                stats.num_verified_per_pos, strict=True)],
            "dropped_rows": feed.num_dropped_rows, "outputs": outputs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="mtbench+gsm8k")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft-prob", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--window", type=int, nargs="+", default=[4, 16, 64, 1_000_000])
    ap.add_argument("--verify-policy", default="fixed:3")
    ap.add_argument("--num-kv-blocks", type=int, default=1024, help="KV blocks per engine (memory: one at a time)")
    ap.add_argument("--out", default="bench_results/context_window.json")
    args = ap.parse_args(argv)
    first = EngineCore(EngineArgs(drafter="none", num_kv_blocks=16))
    tokenizer, loaded = first.tokenizer, first.loaded
    del first
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}]))
               for t in prompt_set(args.sets, args.num_prompts)]
    cells = []
    for p in args.draft_prob:
        runs = [run(loaded, prompts, w, p, args.max_tokens, args.verify_policy, args.num_kv_blocks) for w in args.window]
        widest = runs[-1]["outputs"]  # greedy: every window must give the same text (lossless)
        for r in runs:
            r["same_outputs_as_widest"] = r.pop("outputs") == widest
            print(json.dumps({k: v for k, v in r.items() if k != "accepted_per_pos"}), flush=True)
        cells.extend(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
