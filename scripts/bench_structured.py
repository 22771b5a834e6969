"""Constrained vs free decoding on the embedded SmolLM2-135M (CPU, fp32, greedy): tokens/s at c = 1 and
c = 16, and tau (tokens per verify step) with the DSpark drafter and the suffix drafter.

    python scripts/bench_structured.py --out bench_results/structured.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import default_model_path, load_model
from sparkserve.engine.structured.grammar import GrammarSpec
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import SpecDecodingStats

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "maxLength": 24}},
          "required": ["name", "age", "city"], "additionalProperties": False}
QUESTIONS = ["Describe a person as JSON.", "Give me a user record in JSON.", "A customer as JSON please.",
             "JSON for a student."]


def run(loaded, method: str | None, prompts, params, concurrency: int) -> dict[str, float]:
    kw = dict(drafter="none") if method is None else dict(speculative_method=method, verify_policy="fixed:4")
    args = EngineArgs(dtype="float32", num_kv_blocks=512, block_size=16, max_num_batched_tokens=512,
                      max_num_seqs=16, **kw)
    core = EngineCore(args, loaded=loaded, profile=ThroughputProfile.load("tests/data/profile_small.json"))
    batch = (prompts * 16)[:concurrency]
    start = time.perf_counter()
    steps: list = []
    outs = core.generate_batch(batch, params, steps=steps)
    wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outs)
    stats = SpecDecodingStats.merge(core.num_speculative_tokens, (s.scheduler.spec_decoding for s in steps))
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "tau": round(stats.accepted_length, 3) if method is not None else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(default_model_path(), dtype=torch.float32)
    tok = loaded.tokenizer
    grammar = tok.grammar_compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    result: dict[str, object] = {"model": loaded.name, "threads": 1, "max_tokens": ns.max_tokens, "greedy": True,
                                 "verify_policy": "fixed:4"}
    for mode, g in (("free", None), ("constrained", grammar)):
        params = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens, stop_token_ids=tok.stop_token_ids, grammar=g)
        for method in (None, "dspark", "suffix"):
            for c in (1, 16):
                if c == 16 and method == "suffix":
                    continue
                key = f"{mode}/{method or 'no-spec'}/c{c}"
                result[key] = run(loaded, method, prompts, params, c)
                print(key, result[key], flush=True)
    text = json.dumps(result, indent=2)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
