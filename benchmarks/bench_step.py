"""Bare model step and engine decode TPOT: dense bf16 vs GGUF int4 (``--quantization auto``) vs int8.

Three measurements, one short run (each figure a median of repeated steps, so a loaded machine shows
up as spread, not as one unlucky sample):

All modes are loaded in one process and measured in turns (interleaved), so background load on a
shared machine hits them alike.

1. per-linear M sweep: one SmolLM2-135M-shaped linear at M = 1..16 rows, bf16 dense GEMM vs the int4
   (group 32) and int8 weight-only kernels: the GEMV / GEMM crossover ``--quant-gemv-max-tokens`` uses;
2. bare step: ``sparkserve.engine.throughput_probe.make_step_fn`` (target forward over B decode sequences with 128 tokens
   of context, paged attention included, LM head over the B rows), B = 1, 4, 16, 64;
3. engine decode TPOT at c = 1 with ``--drafter none`` (``EngineCore.step`` wall time of steady
   decode steps, no HTTP), for each quantisation mode; optionally the same with ``--compile``.

    python -m sparkserve.benchmarks.bench_step --out bench_results/step_quant.json [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.engine.quant import quantize_int4
from sparkserve.engine.throughput_probe import make_step_fn
from sparkserve.scheduler.sampling_params import SamplingParams

SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}


def _median_us(fn, repeats: int, inner: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


def linear_sweep(ms: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict:
    """Microseconds per call of each linear shape, by M and kernel."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
        q4 = quantize_int4(w, torch.bfloat16).pack(torch.bfloat16, 1 << 30)
        w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8, generator=gen)
        s8 = torch.rand(n, generator=gen).to(torch.bfloat16)
        inner = 2 if name == "lm_head" else 20
        rows = {}
        for m in ms if name != "lm_head" else (1, 4, 16):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            rows[m] = {
                "bf16": round(_median_us(lambda: torch.nn.functional.linear(x, w), 7, inner), 1),  # noqa: B023
                "int4": round(_median_us(lambda: q4(x), 7, inner), 1),  # noqa: B023
                "int8": round(_median_us(lambda: torch._weight_int8pack_mm(x, w8, s8), 7, inner), 1),  # noqa: B023
            }
        out[name] = rows
    return out


def bare_steps(cores: dict[str, EngineCore], batches: tuple[int, ...], reps: int = 7) -> dict:
    """Median milliseconds of a synthetic decode step over B sequences, per mode; the modes are
    interleaved step by step so the machine's background load hits them alike."""
    steps = {mode: make_step_fn(core.runner, core.num_blocks) for mode, core in cores.items()}
    result: dict[str, dict[int, float]] = {mode: {} for mode in cores}
    for b in batches:
        samples: dict[str, list[float]] = {mode: [] for mode in cores}
        for step in steps.values():
            step(b, b)
        for _ in range(reps if b <= 16 else max(3, reps // 2)):
            for mode, step in steps.items():
                samples[mode].append(step(b, b))
        for mode in cores:
            result[mode][b] = round(statistics.median(samples[mode]) * 1e3, 2)
    return result


def engine_tpot(cores: dict[str, EngineCore], rounds: int = 3, max_tokens: int = 24) -> dict[str, float]:
    """Median milliseconds of the steady decode steps of one greedy request at a time (c = 1), per mode;
    ``rounds`` requests per mode, the modes taking turns."""
    samples: dict[str, list[float]] = {mode: [] for mode in cores}
    for r in range(rounds):
        for mode, core in cores.items():
            tok = core.tokenizer
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a story about a dragon."}]))
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            core.add_request(core.make_request(f"tpot{r}", prompt, params))
            times = []
            while core.has_unfinished_requests():
                start = time.perf_counter()
                core.step()
                if core.last_step is not None and core.last_step.scheduler.num_batched_tokens == 1:
                    times.append(time.perf_counter() - start)
            samples[mode].extend(times[2:])
    return {mode: round(statistics.median(v) * 1e3, 2) for mode, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/step_quant.json")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", default=["none", "auto", "int8"])
    parser.add_argument("--compile", action="store_true", help="also measure --compile (int4) at c = 1")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    ns = parser.parse_args()
    result: dict = {"machine": machine(), "note": ns.note, "torch": torch.__version__,
                    "linear_us": linear_sweep(), "bare_step_ms": {}, "engine_tpot_c1_ms": {}, "load_s": {}}
    print(json.dumps(result["linear_us"]), flush=True)
    cores = {}
    for mode in ns.modes:
        start = time.perf_counter()
        loaded = load_model(None, dtype=torch.bfloat16, quantization="none" if mode == "int8" else mode)
        if mode == "int8":
            loaded.model.quantize_("int8")  # per channel, from the dequantised Q4_1 weights
        result["load_s"][mode] = round(time.perf_counter() - start, 1)
        cores[mode] = EngineCore(EngineArgs(dtype="bfloat16", drafter="none", num_kv_blocks=1024, quantization=mode),
                                 loaded=loaded)
    result["bare_step_ms"] = bare_steps(cores, tuple(ns.batch))
    result["engine_tpot_c1_ms"] = engine_tpot(cores)
    print(json.dumps({k: result[k] for k in ("bare_step_ms", "engine_tpot_c1_ms", "load_s")}), flush=True)
    if ns.compile:
        loaded = load_model(None, dtype=torch.bfloat16, quantization="auto")
        start = time.perf_counter()
        core = EngineCore(EngineArgs(dtype="bfloat16", drafter="none", num_kv_blocks=1024, compile=True),
                          loaded=loaded)
        result["compile_warmup_s"] = round(time.perf_counter() - start, 1)
        result["compile_fell_back"] = sum(w.failed for w in core.runner._compiled_layers)
        both = {"auto": cores["auto"], "auto+compile": core} if "auto" in cores else {"auto+compile": core}
        for key, value in bare_steps(both, (1, 4)).items():
            result["bare_step_ms"][f"{key} (compile run)"] = value
        for key, value in engine_tpot(both, rounds=2).items():
            result["engine_tpot_c1_ms"][f"{key} (compile run)"] = value
        print("compile", result["compile_warmup_s"], result["compile_fell_back"], flush=True)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
