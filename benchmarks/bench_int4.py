"""The weight-stationary int4 CPU kernel (kernels/int4_cpu.py) vs torch's int4 kernel vs dense GEMMs.

1. Linears: every linear shape of SmolLM2-135M (Q4_1 decoder linears, Q8_0 LM head as two int4 planes)
   and of the DSpark drafter, M = 1..16 rows: this kernel, its int8-dot variant (``int4_q8_mm``),
   ``torch.ops.aten._weight_int4pack_mm_for_cpu``
   (engine/quant.py's packing), dense bf16 and dense fp32 ``F.linear``. The four are timed in turns at each
   (shape, M), so background load on a shared machine hits them alike; each sample is the mean of a few
   calls, and the minimum over samples (the least disturbed) is the figure compared (median kept too).
   ``--clock cpu --threads 1`` times the CPU seconds of one thread instead of wall time: what a kernel
   costs a core, which other jobs on a shared machine disturb far less than the wall clock.
2. Engine steps (``--engine``): median ``EngineCore.step`` wall time at c = 1 of a verify step of 1 + 7
   tokens (``--verify-policy fixed:7``, DSpark drafter) and of a decode step (``--drafter none``), and
   the target forward inside each, with every int4 linear routed to this kernel up to 16 rows, to its
   int8-dot variant, the default routing (int4 up to 4 rows: the Q8_0 LM head on this kernel, the rest on
   torch's) and all on torch's (``SPARKSERVE_INT4_KERNEL=0``); 8 engines in one process, requests taking turns.
3. ``--emulate-avx2`` reruns part 1 in a child process with ``ATEN_CPU_CAPABILITY=avx2`` (torch's
   kernels) and ``SPARKSERVE_INT4_ISA=avx2`` (this kernel), as on an AVX2-only CI machine.

    python -m sparkserve.benchmarks.bench_int4 --engine --emulate-avx2 --out bench_results/int4_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.quant import BlockQuant, Routing
from sparkserve.kernels import int4_cpu

# name -> (N, K, int4 planes)
SHAPES = {
    "qkv_proj": (960, 576, 1), "o_proj": (576, 576, 1), "gate_up_proj": (3072, 576, 1),
    "down_proj": (576, 1536, 1), "lm_head_q8_0": (49152, 576, 2),
    "drafter_fc": (576, 2880, 1), "drafter_qkv_proj": (960, 576, 1), "drafter_gate_up_proj": (3072, 576, 1),
    "drafter_down_proj": (576, 1536, 1), "drafter_markov_w": (49152, 64, 1),
}
KERNELS = ("weight_stationary", "ws_int8dot", "torch_int4", "dense_bf16", "dense_fp32")
# engine configurations: SPARKSERVE_INT4_KERNEL and the routing of every int4 linear (engine/quant.py)
ENGINE_KERNELS = {"weight_stationary": ("auto", Routing.up_to(16, "int4_ws")),
                  "ws_int8dot": ("auto", Routing.up_to(16, "int4_ws_q8")),
                  "default": ("auto", Routing.up_to(4)), "torch_int4": ("0", Routing.up_to(4))}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds (all threads)
_clock = CLOCKS["wall"]


def _mean_us(fn, inner: int) -> float:
    start = _clock()
    for _ in range(inner):
        fn()
    return (_clock() - start) / inner * 1e6


def _block(n: int, k: int, planes: int, gen: torch.Generator) -> BlockQuant:
    return BlockQuant(tuple(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8) for _ in range(planes)),
                      tuple(torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3 for _ in range(planes)),
                      tuple(torch.randn(n, k // 32, generator=gen) * 0.02 for _ in range(planes)))


@contextlib.contextmanager
def kernel_mode(mode: str):
    """``SPARKSERVE_INT4_KERNEL=mode`` while packing / loading (engine/quant.py: kernel_mode)."""
    old = os.environ.get("SPARKSERVE_INT4_KERNEL")
    os.environ["SPARKSERVE_INT4_KERNEL"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPARKSERVE_INT4_KERNEL"]
        else:
            os.environ["SPARKSERVE_INT4_KERNEL"] = old


def _pack(block: BlockQuant, path: str):
    return block.pack_as(torch.bfloat16, Routing.up_to(1 << 30, path))


def linear_sweep(ms: list[int], repeats: int) -> dict:
    """Microseconds per call by shape, M and kernel (bf16 activations), plus ratios to this kernel's 1 row."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (n, k, planes) in SHAPES.items():
        block = _block(n, k, planes, gen)
        w32 = block.canonical(torch.bfloat16)
        weights = {"weight_stationary": _pack(block, "int4_ws"), "ws_int8dot": _pack(block, "int4_ws_q8"),
                   "torch_int4": _pack(block, "int4_gemv"),
                   "w_bf16": w32.to(torch.bfloat16), "w_fp32": w32}
        assert weights["weight_stationary"].kernel is not None
        inner = 2 if n * k * planes > 10_000_000 else 10
        rows = {}
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            xf = x.float()
            calls = {"weight_stationary": lambda x=x, w=weights: w["weight_stationary"](x),
                     "ws_int8dot": lambda x=x, w=weights: w["ws_int8dot"](x),
                     "torch_int4": lambda x=x, w=weights: w["torch_int4"](x),
                     "dense_bf16": lambda x=x, w=weights: F.linear(x, w["w_bf16"]),
                     "dense_fp32": lambda xf=xf, w=weights: F.linear(xf, w["w_fp32"])}
            samples: dict[str, list[float]] = {kname: [] for kname in KERNELS}
            for fn in calls.values():
                fn()
            for _ in range(repeats):  # kernels in turns
                for kname, fn in calls.items():
                    samples[kname].append(_mean_us(fn, inner))
            rows[m] = {kname: {"min": round(min(v), 1), "median": round(statistics.median(v), 1)}
                       for kname, v in samples.items()}
        one = rows[ms[0]]["weight_stationary"]["min"]
        out[name] = {"shape_nk": [n, k], "planes": planes, "us": rows,
                     "ws_ratio_to_1_row": {m: round(r["weight_stationary"]["min"] / one, 2) for m, r in rows.items()},
                     "int8dot_ratio_to_1_row": {m: round(r["ws_int8dot"]["min"] / rows[ms[0]]["ws_int8dot"]["min"], 2)
                                                for m, r in rows.items()},
                     "ws_speedup_vs": {kname: {m: round(r[kname]["min"] / r["weight_stationary"]["min"], 2)
                                               for m, r in rows.items()} for kname in KERNELS[1:]},
                     "int8dot_speedup_vs": {kname: {m: round(r[kname]["min"] / r["ws_int8dot"]["min"], 2)
                                                    for m, r in rows.items()} for kname in ("weight_stationary", "torch_int4", "dense_bf16")}}
        print(name, json.dumps({m: {kn: v["min"] for kn, v in r.items()} for m, r in rows.items()}), flush=True)
    return out


def engine_steps(rounds: int, max_tokens: int, kernels: tuple[str, ...] = tuple(ENGINE_KERNELS)) -> dict:
    """Median ms of verify (1 + 7 tokens) and decode steps at c = 1, whole step and target forward, with
    the int4 linears on this kernel and on torch's."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.engine.loader import load_model
    from sparkserve.scheduler.sampling_params import SamplingParams

    configs = {"verify_fixed7": {"verify_policy": "fixed:7"}, "decode": {"drafter": "none"}}
    cores, forward_s = {}, {}
    for kernel in kernels:
        mode, routing = ENGINE_KERNELS[kernel]
        with kernel_mode(mode):
            for cname, kw in configs.items():
                loaded = load_model(None, dtype=torch.bfloat16, quantization="auto", gemv_max_tokens=routing)
                key = f"{cname}/{kernel}"
                forward_s[key] = []
                real = loaded.model.forward

                def timed(*a, _real=real, _key=key, **k):
                    start = time.perf_counter()
                    try:
                        return _real(*a, **k)
                    finally:
                        forward_s[_key].append(time.perf_counter() - start)

                loaded.model.forward = timed
                cores[key] = EngineCore(EngineArgs(dtype="bfloat16", num_kv_blocks=512, **kw), loaded=loaded)
    steps: dict[str, list[float]] = {key: [] for key in cores}
    forwards: dict[str, list[float]] = {key: [] for key in cores}
    want = {"verify_fixed7": 8, "decode": 1}
    for r in range(rounds):
        for key, core in cores.items():
            tok = core.tokenizer
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a story about a dragon."}]))
            core.add_request(core.make_request(f"r{r}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                                ignore_eos=True)))
            while core.has_unfinished_requests():
                forward_s[key].clear()
                start = time.perf_counter()
                core.step()
                if core.last_step.scheduler.num_batched_tokens == want[key.split("/")[0]]:
                    steps[key].append(time.perf_counter() - start)
                    forwards[key].append(forward_s[key][0] if forward_s[key] else float("nan"))
    result = {key: {"step_ms": round(statistics.median(v[2:]) * 1e3, 2), "target_forward_ms":
                    round(statistics.median(forwards[key][2:]) * 1e3, 2), "steps": len(v)} for key, v in steps.items()}
    for kernel in kernels:
        v, d = result[f"verify_fixed7/{kernel}"], result[f"decode/{kernel}"]
        result[f"ratio_verify_to_decode/{kernel}"] = {
            "step": round(v["step_ms"] / d["step_ms"], 2),
            "target_forward": round(v["target_forward_ms"] / d["target_forward_ms"], 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/int4_cpu.json")
    parser.add_argument("--m", type=int, nargs="+", default=list(range(1, 17)))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--engine", action="store_true", help="also the verify-vs-decode engine steps")
    parser.add_argument("--no-linears", action="store_true", help="skip part 1 (e.g. an engine-only run)")
    parser.add_argument("--rounds", type=int, default=3, help="requests per engine configuration")
    parser.add_argument("--engine-kernels", nargs="+", choices=list(ENGINE_KERNELS), default=list(ENGINE_KERNELS),
                        help="the engine configurations of part 2 (two engines each)")
    parser.add_argument("--emulate-avx2", action="store_true", help="also part 1 under AVX2 (child process)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="part 1's clock; cpu (with --threads 1): CPU time of the one thread, what a kernel "
                             "costs a core, steadier than wall time on a machine shared with other jobs")
    parser.add_argument("--note", default="")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    global _clock
    _clock = CLOCKS[ns.clock]
    if not int4_cpu.load():
        sys.exit("the int4 CPU kernel is not built: run scripts/setup.sh")
    result: dict = {"machine": {**machine(),
                                "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                "int4_kernel_isa": int4_cpu.selected_isa(),
                                "int8dot_isa": os.environ.get("SPARKSERVE_INT4_ISA") or int4_cpu.supported_q8_isas()[-1]},
                    "note": ns.note, "clock": ns.clock, "linear_us": {} if ns.no_linears else linear_sweep(ns.m, ns.repeats)}
    if ns.engine:
        result["engine_c1"] = engine_steps(ns.rounds, max_tokens=40, kernels=tuple(ns.engine_kernels))
        print(json.dumps(result["engine_c1"]), flush=True)
    if ns.emulate_avx2:
        child_out = Path(ns.out).with_suffix(".avx2.json")
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "SPARKSERVE_INT4_ISA": "avx2"}
        subprocess.run([sys.executable, "-m", "sparkserve.benchmarks.bench_int4", "--out", str(child_out),
                        "--repeats", str(ns.repeats), "--clock", ns.clock, *(["--threads", str(ns.threads)] if ns.threads else []), "--m", *map(str, ns.m)], env=env, check=True)
        result["avx2_emulation"] = json.loads(child_out.read_text())
        child_out.unlink()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=1))
    print("wrote", ns.out)


if __name__ == "__main__":
    main()
