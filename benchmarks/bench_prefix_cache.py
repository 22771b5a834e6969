"""Prefix caching on vs off (issue "Prefix caching"), through ``EngineCore`` with timed arrivals (no HTTP).

Workloads, each run on a cache-on and a cache-off engine in alternation, ``--rounds`` times in one run
(each round uses prompts neither engine has seen, so only the intended sharing hits):
  (a) ``multiturn``: MT-bench two-turn conversations, one user at a time; the second turn carries the first
      answer. TTFT of the second turn and the prefix-cache hit rate (cached / prompt tokens).
  (b) ``shared``: ``--shared-requests`` requests with one ~1,000-token system prompt and their own question,
      arriving at ``--rate`` requests/s (Poisson, seeded) after one warm request. TTFT p50 / p99, output tok/s.
  (c) ``unique``: the same arrivals with unique prompts (no sharing): caching must cost nothing here.
Plus a microbenchmark of the lookup (block keys + ``cached_prefix``) per request of ~1,000 tokens.

    python -m sparkserve.benchmarks.bench_prefix_cache --rounds 3 --out bench_results/prefix_cache.json

TTFT here = first output token time - arrival time (seconds, ``time.perf_counter``), engine only.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.loadtests.prompts import load_prompts, shared_data_dir
from sparkserve.scheduler.block_manager import block_keys
from sparkserve.scheduler.sampling_params import SamplingParams


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed_run(core: EngineCore, prompts: list[list[int]], arrivals: list[float], max_tokens: int,
              tag: str) -> dict:
    """Submit ``prompts[i]`` at ``arrivals[i]`` seconds after start; returns per-request TTFT, tokens, hits."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    arrived: dict[str, float] = {}
    ttft: dict[str, float] = {}
    cached: dict[str, int] = {}
    tokens = 0
    while pending or core.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            rid = f"{tag}-{i}"
            core.add_request(core.make_request(rid, prompts[i], params))
            arrived[rid] = start + arrivals[i]
        if not core.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[pending[0]] - now))
            continue
        for out in core.step():
            tokens += len(out.new_token_ids)
            if out.request_id not in ttft and out.new_token_ids:
                ttft[out.request_id] = time.perf_counter() - arrived[out.request_id]
                cached[out.request_id] = out.num_cached_tokens
    wall = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts)
    return {"ttft_s": list(ttft.values()), "output_tokens": tokens, "wall_s": wall,
            "hit_rate": sum(cached.values()) / prompt_tokens}


def summarise(runs: list[dict]) -> dict:
    ttft = [t for r in runs for t in r["ttft_s"]]
    return {"requests": len(ttft), "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1),
            "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1),
            "ttft_p50_ms_per_round": [round(1e3 * percentile(r["ttft_s"], 50), 1) for r in runs],
            "output_tok_s": round(sum(r["output_tokens"] for r in runs) / sum(r["wall_s"] for r in runs), 2),
            "hit_rate": round(statistics.mean(r["hit_rate"] for r in runs), 3)}


def chat_ids(tok, messages: list[dict]) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def system_prompt(tok, target_tokens: int) -> str:
    """A ~``target_tokens`` system prompt of real text (GSM8K problems as 'reference examples')."""
    text, parts = "You are a careful assistant. Reference examples follow.\n", load_prompts("gsm8k")
    i = 0
    while len(tok.encode(text)) < target_tokens:
        text += f"Example {i + 1}: {parts[i]}\n"
        i += 1
    return text


def lookup_microbench(core: EngineCore, prompt: list[int], repeats: int = 200) -> dict:
    """Seconds per request of what admission adds with caching on: block keys + the cached-prefix walk."""
    bm = core.scheduler.block_manager
    extra = core.scheduler.config.cache_extra_key
    start = time.perf_counter()
    for _ in range(repeats):
        keys = block_keys(prompt, bm.block_size, extra, [])
        bm.cached_prefix(keys, (len(prompt) - 1) // bm.block_size)
    per = (time.perf_counter() - start) / repeats
    return {"prompt_tokens": len(prompt), "lookup_us_per_request": round(per * 1e6, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=4, help="workload (a) per round")
    ap.add_argument("--shared-requests", type=int, default=32, help="workload (b) per round")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second, workloads (b) and (c)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--drafter", default="none", help="engine drafter (none keeps the step cost the same)")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_model(None, dtype=torch.bfloat16)
    tok = loaded.tokenizer
    engines = {on: EngineCore(EngineArgs(drafter=ns.drafter, enable_prefix_caching=on, max_num_seqs=64),
                              loaded=loaded) for on in (True, False)}
    with (shared_data_dir() / "prompts" / "mt_bench_question.jsonl").open() as f:
        mt = [json.loads(line)["turns"] for line in f if line.strip()]
    questions = load_prompts("spec_bench:qa") + load_prompts("gsm8k")[200:]
    system = system_prompt(tok, ns.system_tokens)
    rng = random.Random(0)
    results: dict[str, dict[bool, list[dict]]] = {w: {True: [], False: []} for w in ("multiturn", "shared", "unique")}
    # warm both engines (first-step costs), and the cache-on engine with the shared system prompt
    for on, core in engines.items():
        warm = chat_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}])
        timed_run(core, [warm], [0.0], 2, f"warm{on}")
    used = 0
    for r in range(ns.rounds):
        convs = mt[r * ns.conversations:(r + 1) * ns.conversations]
        shared_q = questions[used:used + ns.shared_requests]
        unique_q = questions[used + ns.shared_requests:used + 2 * ns.shared_requests]
        used += 2 * ns.shared_requests
        gaps = [rng.expovariate(ns.rate) for _ in range(ns.shared_requests)]
        arrivals = [sum(gaps[:i]) for i in range(ns.shared_requests)]
        for on in (True, False) if r % 2 == 0 else (False, True):
            core = engines[on]
            turn2 = []
            for c, turns in enumerate(convs):  # (a) one user: first turn, then the second with its answer
                first = [{"role": "user", "content": turns[0]}]
                answer = core.generate_batch([chat_ids(tok, first)], SamplingParams(temperature=0.0, max_tokens=64),
                                             request_prefix=f"t1-{r}-{on}-{c}")[0]
                second = first + [{"role": "assistant", "content": tok.decode(answer)},
                                  {"role": "user", "content": turns[1]}]
                turn2.append(timed_run(core, [chat_ids(tok, second)], [0.0], ns.max_tokens, f"t2-{r}-{on}-{c}"))
            results["multiturn"][on].append({"ttft_s": [t for x in turn2 for t in x["ttft_s"]],
                                             "output_tokens": sum(x["output_tokens"] for x in turn2),
                                             "wall_s": sum(x["wall_s"] for x in turn2),
                                             "hit_rate": statistics.mean(x["hit_rate"] for x in turn2)})
            shared = [chat_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": q}])
                      for q in shared_q]
            results["shared"][on].append(timed_run(core, shared, arrivals, ns.max_tokens, f"s-{r}-{on}"))
            unique = [chat_ids(tok, [{"role": "user", "content": q}]) for q in unique_q]
            results["unique"][on].append(timed_run(core, unique, arrivals, ns.max_tokens, f"u-{r}-{on}"))
            print(json.dumps({"round": r, "cache": on, **{w: summarise([results[w][on][-1]])
                                                           for w in results}}), flush=True)
    summary = {w: {"cache_on": summarise(v[True]), "cache_off": summarise(v[False])} for w, v in results.items()}
    for w in summary:
        on, off = summary[w]["cache_on"], summary[w]["cache_off"]
        summary[w]["ttft_p50_off_over_on"] = round(off["ttft_p50_ms"] / max(on["ttft_p50_ms"], 1e-9), 2)
    shared_prompt = chat_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}])
    out = {"machine": machine(), "config": vars(ns), "system_prompt_tokens": len(tok.encode(system)),
           "summary": summary, "lookup": lookup_microbench(engines[True], shared_prompt)}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=1), json.dumps(out["lookup"]))


if __name__ == "__main__":
    main()
