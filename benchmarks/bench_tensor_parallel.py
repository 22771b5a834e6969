"""Step time at tensor-parallel size 1 vs 2 on the CPU, and the share of rank 0's step spent in the model's
collectives (all-reduce after o_proj / down_proj, all-gather of the logit shards).

A correctness-of-plumbing measurement, not a speed claim: on the CPU both ranks share the same cores (TP = 1
runs with all of them, TP = 2 with half each), so TP cannot win here; the number to read is the collective
share. The model is a random fp32 Llama of a SmolLM2-like width whose heads divide by 2 (SmolLM2's 9 do
not). Rounds alternate TP = 1 and TP = 2 over the same requests (the machine may be shared); each round
runs a batch to completion and records every step's execute time (``StepStats.execute_s``).

Usage: ``python -m sparkserve.benchmarks.bench_tensor_parallel --out bench_results/tensor_parallel_cpu.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.cpu_plan import cpu_signature
from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.parallel.executor import TensorParallelRunner
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.tiny import EOS, random_llama

CONFIG = ModelConfig(
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=12,
    num_attention_heads=8, num_key_value_heads=2, head_dim=72, rms_norm_eps=1e-5, rope_theta=10000.0,
    rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=True, attention_bias=False,
    qk_norm=False, bos_token_id=None, eos_token_id=EOS,
)


def bench_build() -> tuple[LoadedModel, Drafter | None]:
    """The benchmark's random model on every rank (seeded: the same weights everywhere)."""
    import types

    tokenizer = types.SimpleNamespace(eos_token_id=EOS, stop_token_ids=(EOS,), bos_token_id=None)
    return LoadedModel(random_llama(CONFIG, seed=0, scale=0.05), CONFIG, tokenizer, "bench-llama"), None


def _round(core: EngineCore, threads: int, batch: int, prompt_len: int, max_tokens: int) -> dict:
    torch.set_num_threads(threads)
    runner = core.runner
    times = runner.tp.times if isinstance(runner, TensorParallelRunner) else None
    before = dataclasses.replace(times) if times is not None else None
    prompts = [[2 + (i * 31 + j) % 4000 for j in range(prompt_len)] for i in range(batch)]
    steps: list = []
    core.generate_batch(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        steps=steps)
    decode = [s.execute_s for s in steps if s.scheduler.num_batched_tokens == s.scheduler.num_decode_requests] if steps else []
    execute = sum(s.execute_s for s in steps)
    collective = (times.seconds - before.seconds) if times is not None else 0.0
    return {"decode_step_ms_median": 1e3 * statistics.median(decode) if decode else None,
            "execute_s_total": execute, "collective_s": collective,
            "collective_calls": (times.calls - before.calls) if times is not None else 0,
            "collective_share": collective / execute if execute else None, "steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("bench_results/tensor_parallel_cpu.json"))
    ns = parser.parse_args()
    cores_n = os.cpu_count() or 2
    args = dict(dtype="float32", num_kv_blocks=256, block_size=16, max_num_seqs=ns.batch, drafter="none",
                cpu_plan=False, quantization="none")
    build = functools.partial(bench_build)
    half = max(1, cores_n // 2)
    engines = {1: EngineCore(EngineArgs(**args, num_threads=cores_n), build=build),
               2: EngineCore(EngineArgs(**args, tensor_parallel_size=2, num_threads=half), build=build)}
    # (TP, torch threads per rank): TP = 1 with all cores and with half of them (the per-rank share at TP = 2)
    configs = {f"tp1_threads{cores_n}": (1, cores_n), f"tp1_threads{half}": (1, half), f"tp2_threads{half}": (2, half)}
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    load_before = os.getloadavg()
    try:
        for tp, threads in configs.values():  # warm-up, not recorded
            _round(engines[tp], threads, ns.batch, ns.prompt_len, 2)
        for _ in range(ns.rounds):
            for name, (tp, threads) in configs.items():  # alternate: every configuration sees the same load
                rounds[name].append(_round(engines[tp], threads, ns.batch, ns.prompt_len, ns.max_tokens))
    finally:
        engines[2].close()
    med = {name: statistics.median(r["decode_step_ms_median"] for r in rounds[name]) for name in configs}
    tp2 = f"tp2_threads{half}"
    share = statistics.median(r["collective_share"] for r in rounds[tp2])
    signature = cpu_signature()
    result = {
        "benchmark": "tensor_parallel_cpu", "machine": machine() | {"cpu_flags": " ".join(signature.flags)},
        "note": "shared 2-core machine: TP=2 splits the same cores between two processes (gloo over loopback)",
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "model": dataclasses.asdict(CONFIG), "batch": ns.batch, "prompt_len": ns.prompt_len,
        "max_tokens": ns.max_tokens, "rounds": rounds, "decode_step_ms_median": med,
        "tp2_over_tp1_decode_step": {name: med[tp2] / med[name] for name in configs if name != tp2},
        "tp2_collective_share_of_execute": share,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("decode_step_ms_median", "tp2_over_tp1_decode_step",
                                             "tp2_collective_share_of_execute")}))


if __name__ == "__main__":
    main()
