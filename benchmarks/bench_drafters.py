"""Drafter benchmark (issue "Lossless speculative decoding"): tokens per verify step and acceptance
by position for each drafter kind on MT-bench prompts with the SmolLM2 target, through the real engine
(fixed:7 verification, greedy), plus the drafter's own cost per step relative to a target decode step.

    python -m sparkserve.benchmarks.bench_drafters --out bench_results/drafters.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.engine.outputs import StepStats
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.dspark_loader import random_drafter_config
from sparkserve.engine.spec_decode.factory import SHIPPED_DRAFT_VOCAB, shipped_drafter_path
from sparkserve.engine.throughput_probe import make_step_fn
from sparkserve.loadtests.prompts import load_prompts
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import SpecDecodingStats
from sparkserve.testing.oracle import LookupOracleDrafter


def _random(loaded, markov_rank: int) -> DSparkDrafter:
    cfg = loaded.config
    config = random_drafter_config(
        cfg,  # ModelConfig has the attribute names random_drafter_config reads
        target_layer_ids=(1, 8, 15, 22, 28), block_size=7, num_layers=1, markov_rank=markov_rank,
        confidence=markov_rank > 0)
    drafter = DSparkDrafter(config, loaded.model.embed_tokens.weight, loaded.model.lm_head_weight)
    drafter.reset_parameters(torch.Generator().manual_seed(0))
    return drafter.to(loaded.model.embed_tokens.weight.dtype)


def _run(loaded, drafter, prompts, params, label: str) -> dict:
    core = EngineCore(EngineArgs(verify_policy="fixed:7", max_num_seqs=len(prompts), drafter="none" if drafter is None else None),
                      loaded=loaded, drafter=drafter)
    start = time.perf_counter()
    steps: list[StepStats] = []
    outputs = core.generate_batch(prompts, params, request_prefix=label, steps=steps)
    wall = time.perf_counter() - start
    s = SpecDecodingStats.merge(core.num_speculative_tokens, (step.scheduler.spec_decoding for step in steps))
    return {
        "drafter": label, "wall_s": wall, "output_tokens": sum(map(len, outputs)),
        "tokens_per_verify_step": s.accepted_length, "verify_steps": s.num_drafts,
        "prefix_survival_by_position": [a / v if v else None for a, v in zip(s.num_accepted_per_pos, s.num_verified_per_pos, strict=True)],
        "outputs": outputs,
    }


def _cost(loaded, drafter, vocab: int | None) -> dict:
    core = EngineCore(EngineArgs(verify_policy="fixed:7", max_num_seqs=64), loaded=loaded, drafter=drafter)
    drafter.draft_vocab_size = vocab
    step = make_step_fn(core.runner, core.num_blocks)
    spec = core.runner.speculator
    rows = {}
    for r in (1, 16, 64):
        def timed(fn, n=4):
            fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) / n
        with_drafter = timed(lambda r=r: step(r, r))
        core.runner.speculator = None
        target = timed(lambda r=r: step(r, r))
        core.runner.speculator = spec
        rows[str(r)] = {"target_decode_step_s": target, "drafter_s": max(0.0, with_drafter - target),
                        "drafter_over_target": max(0.0, with_drafter - target) / target}
    drafter.draft_vocab_size = None
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="bench_results/drafters.json")
    args = ap.parse_args(argv)
    loaded = load_model(None, dtype=getattr(torch, args.dtype))
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in load_prompts("mt_bench")[: args.num_prompts]]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop_token_ids=tok.stop_token_ids)
    base = _run(loaded, None, prompts, params, "none")
    refs = {tuple(p): o for p, o in zip(prompts, base["outputs"], strict=True)}
    results = []
    from sparkserve.engine.spec_decode.dspark_loader import load_drafter

    shipped = load_drafter(shipped_drafter_path(), loaded.model.embed_tokens.weight, loaded.model.lm_head_weight,
                           dtype=loaded.model.embed_tokens.weight.dtype)
    kinds = [("dspark-trained", shipped), ("dspark-random", _random(loaded, 64)), ("dflash-random", _random(loaded, 0))]
    kinds += [(f"oracle-error{rate}", LookupOracleDrafter(refs, loaded.config.vocab_size, 7, seed=1, error_rate=rate))
              for rate in (0.0, 0.3, 0.7, 1.0)]
    for label, drafter in kinds:
        res = _run(loaded, drafter, prompts, params, label)
        res["identical_to_no_speculation"] = sum(o == b for o, b in zip(res["outputs"], base["outputs"], strict=True))
        results.append({k: v for k, v in res.items() if k != "outputs"})
        print(json.dumps({k: results[-1][k] for k in ("drafter", "tokens_per_verify_step", "wall_s")}), flush=True)
    cost = {"full_vocab": _cost(loaded, shipped, None), f"draft_vocab_{SHIPPED_DRAFT_VOCAB}": _cost(loaded, shipped, SHIPPED_DRAFT_VOCAB)}
    out = {"config": {**vars(args), "policy": "fixed:7", "temperature": 0.0, "dataset": "mt_bench first turns",
                      "threads": torch.get_num_threads()},
           "no_speculation_wall_s": base["wall_s"], "drafters": results, "drafter_cost": cost}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(cost, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
