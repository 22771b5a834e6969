"""Cost of prompt scoring (``echo`` + ``logprobs``, i.e. ``SamplingParams.prompt_logprobs``) against a
plain prefill of the same prompt, on the engine (no HTTP); the issue's goal is a ratio <= 1.2.

Both arms run one request of ``--prompt-len`` tokens with ``max_tokens=1`` (the prefill and the one
token sampled from its last logits) and the prefix cache off, so every run computes the whole prompt.
Arms alternate (A B A B ...) so load from other processes hits both alike; the result is the ratio of
medians, in seconds per request::

    python -m sparkserve.benchmarks.bench_prompt_logprobs --out bench_results/prompt_logprobs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.sampling_params import SamplingParams

PROFILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "profile_small.json"


def _run_once(core: EngineCore, rid: str, prompt: list[int], params: SamplingParams) -> float:
    """Seconds from admission to the request's end."""
    start = time.perf_counter()
    core.add_request(core.make_request(rid, prompt, params))
    while core.has_unfinished_requests():
        core.step()
    return time.perf_counter() - start


def _cpu_flags() -> list[str]:
    path = Path("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in path.read_text().splitlines() if line.startswith("flags")),
                 []) if path.exists() else []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--top", type=int, default=1, help="logprobs k (lm-eval sends 1)")
    parser.add_argument("--drafter", default=None, help='"none" for no speculation (default: the shipped drafter)')
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args()
    args = EngineArgs(dtype="float32", max_num_batched_tokens=max(1024, ns.prompt_len), enable_prefix_caching=False,
                      num_kv_blocks=ns.prompt_len // 16 + 8, max_num_seqs=4,
                      drafter=ns.drafter)
    core = EngineCore(args, profile=ThroughputProfile.load(PROFILE))  # a stored profile: no start-up profiling
    prompt = [(17 * i + 5) % 20000 + 100 for i in range(ns.prompt_len)]
    arms = {"plain": SamplingParams(temperature=0.0, max_tokens=1),
            "prompt_logprobs": SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=ns.top)}
    for name, params in arms.items():  # warm-up
        _run_once(core, f"warm-{name}", prompt, params)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(ns.rounds):
        for name, params in arms.items():
            times[name].append(_run_once(core, f"{name}-{r}", prompt, params))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"prompt_len": ns.prompt_len, "top": ns.top, "rounds": ns.rounds, "drafter": ns.drafter,
              "median_s": medians, "ratio": medians["prompt_logprobs"] / medians["plain"], "times_s": times,
              "machine": {**machine(), "cpu_flags": _cpu_flags()}}
    print(json.dumps({k: result[k] for k in ("prompt_len", "median_s", "ratio")}, indent=1))
    if ns.out is not None:
        ns.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
