"""The GPU check of issue 13: four phases, each writing its JSON to ``--out`` as soon as it ends, so a
run cut off by the device's time limit still returns the earlier phases.

  1. tests      the kernel tests compiled for real (tests/kernels/test_kernels.py, its CUDA-only cases included)
  2. kernels    microbenchmarks (benchmarks/bench_kernels.py): copy bandwidth, decode attention (one layer) at batch
                32-256 x context 2k/4k/8k vs that bandwidth, verify blocks vs SDPA on gathered K/V,
                the sampling kernels vs torch
  3. serving    the engine in process at concurrency 1/16/64/256 without speculation, with dspark and
                fixed:7 (through ``EngineArgs(device="cuda")``: decode and uniform verify steps replay CUDA
                graphs), decode steps through the graphs vs eager at batch 1-256 (``graph_vs_eager``), plus
                the step-time staircase SPS(B, R)
  4. exactness  fp32 with TF32 off: the attention kernel at serving shapes vs the torch reference, and
                greedy engine outputs vs the CPU fp32 reference loop by the near-tie rule

Runs on torch 2.11 / triton 3.6 without fastapi, pydantic, uvicorn, sse-starlette or openai (gguf and
the model are carried: ``stage_carried_files``, scripts/gpu_check.sh). ``--dry-run`` exercises the driver on any machine: it writes every
phase's plan without running it, except the probe, which runs on the CPU (tests/kernels/test_kernels.py
and tests/kernels/test_gpu_check_dry.py run it). Set-up (staging the carried files, ``git``) is guarded: its
error is recorded in summary.json and the phases still run; summary.json is written before the first one.

Usage: python scripts/gpu_check.py --out DIR [--dry-run] [--skip serving ...] [--budget-serving 240]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_sparkserve_from_checkout() -> None:
    """Make ``import sparkserve.*`` work on a copy of the tree that was never installed (the GPU box).

    The repository root is not put on sys.path: its kernels/ would shadow Hugging Face's ``kernels``
    package, which transformers imports. The namespace package is loaded from its file instead; its
    ``__init__`` adds the root to the namespace's own search path (sparkserve/__init__.py).
    """
    if importlib.util.find_spec("sparkserve") is not None:
        return
    init = ROOT / "sparkserve" / "__init__.py"
    spec = importlib.util.spec_from_file_location("sparkserve", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sparkserve"] = module
    spec.loader.exec_module(module)


_import_sparkserve_from_checkout()

PHASES = ("probe", "tests", "kernels", "serving", "exactness")
CONCURRENCIES, POLICIES = (1, 16, 64, 256), ("none", "dspark", "fixed:7")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (one JSON per phase + summary.json)")
    parser.add_argument("--dry-run", action="store_true", help="write each phase's plan, run nothing")
    parser.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to skip")
    for phase, seconds in zip(PHASES, (30, 120, 120, 200, 90), strict=True):  # < the device's 600 s per command
        parser.add_argument(f"--budget-{phase}", type=float, default=seconds, help=f"seconds for phase {phase}")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request in the serving phase")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--concurrency", nargs="*", type=int, default=list(CONCURRENCIES))
    parser.add_argument("--window", choices=sorted(WINDOWS), help="run one device window (phases and budgets)")
    args = parser.parse_args(argv)
    if args.window is not None:
        window = WINDOWS[args.window]
        args.skip = sorted(set(args.skip) | (set(PHASES) - set(window["budgets"])))
        for phase, seconds in window["budgets"].items():
            setattr(args, f"budget_{phase}", seconds)
        for name, value in window.get("args", {}).items():
            setattr(args, name, value)
    return args


# Device windows on one warm machine (issue 26): phases and seconds, each window inside its limit
# (1: <= 120 s, nothing carried; 2 and 3: <= 150 s; 3 needs the model carried in two calls, gpu_check.sh).
WINDOWS: dict[str, dict] = {
    "1": {"budgets": {"probe": 25, "tests": 60, "exactness": 30}, "args": {"tests_marker": "gpu"}},
    "2": {"budgets": {"kernels": 50, "serving": 95}},
    "3": {"budgets": {"serving": 140}, "args": {"policies": ["none", "dspark"], "concurrency": [1, 16, 64]}},
}


def write_json(path: Path, payload: object) -> None:
    """Write atomically (a cut-off run never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def environment() -> dict:
    """Versions and the device, as JSON."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "machine": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    info["commit"] = git_commit()
    return info


def git_commit() -> str | None:
    """The checkout's commit, or None (no ``git`` on the device image, or no repository there)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def guarded(fn: Callable[[], dict]) -> dict:
    """``fn()``, or ``{"error": ...}`` when it raises: set-up must never stop the first phase."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON instead
        return {"error": repr(exc)}


def stage_carried_files(root: Path = ROOT, tmp: Path = Path("/tmp")) -> dict:
    """Use what train/gpu_prepare.sh staged in data/gpu_a + data/gpu_b (each carried by its own device
    call): the pure-Python gguf package (on sys.path and PYTHONPATH), the GGUF reassembled from its two
    parts and checked against its sha256 (``$SPARKSERVE_MODEL_PATH``), the prompt files
    (``$SPARKSERVE_DATA``). Returns what was staged. Raises ValueError when the parts are corrupt."""
    staged = {}
    a, b = root / "data" / "gpu_a", root / "data" / "gpu_b"
    if (b / "site").is_dir():
        sys.path.insert(0, str(b / "site"))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(b / "site"), os.environ.get("PYTHONPATH")) if p)
        staged["site"] = str(b / "site")
    parts = sorted(a.glob("gguf.part.*")) + sorted(b.glob("gguf.part.*"))
    if not os.environ.get("SPARKSERVE_MODEL_PATH") and parts and (b / "gguf.sha256").is_file():
        model = tmp / "smollm2.gguf"
        digest = hashlib.sha256()
        with model.open("wb") as f:
            for part in parts:
                data = part.read_bytes()
                digest.update(data)
                f.write(data)
        if digest.hexdigest() != (b / "gguf.sha256").read_text().split()[0]:
            raise ValueError(f"model parts {[p.name for p in parts]} do not match gguf.sha256")
        os.environ["SPARKSERVE_MODEL_PATH"] = staged["model"] = str(model)
    if (b / "prompts").is_dir() and not os.environ.get("SPARKSERVE_DATA"):
        os.environ["SPARKSERVE_DATA"] = staged["data"] = str(b)
    return staged


class Deadline:
    """Seconds left in a phase's budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ---------------------------------------------------------------- phase 0: probe (runs in --dry-run too)


def phase_probe(args: argparse.Namespace, deadline: Deadline) -> dict:
    """What a first GPU run needs, checked in seconds: a C compiler (Triton builds its launcher with it), the
    card's shared memory per block, a trivial Triton kernel, and an engine smoke on a seeded tiny model
    (no speculation and fixed:3 with an oracle drafter, decode and verify steps through the CUDA graphs, and
    no speculation eager: an ``error`` finish, other eager tokens or no graph step served fails it). ``--dry-run`` runs
    it on the CPU (the kernels in Triton's interpreter are not launched there)."""
    import shutil

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    result: dict = {"status": "ok", "c_compiler": shutil.which("cc") or shutil.which("gcc")}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        result["shared_memory_per_block_optin"] = getattr(props, "shared_memory_per_block_optin", None)
        result["trivial_kernel"] = guarded(trivial_kernel)
    result["engine_smoke"] = engine_smoke("cuda" if cuda else "cpu")
    if result["engine_smoke"].get("status") != "ok" or "error" in result.get("trivial_kernel", {}):
        result["status"] = "failed"
    return result


def trivial_kernel() -> dict:
    """Compile and run a one-line Triton kernel on the GPU (the launcher build included)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.zeros(100, device="cuda")
    start = time.perf_counter()
    add_one[(1,)](x, 100, BLOCK=128)
    torch.cuda.synchronize()
    return {"ok": bool((x == 1).all()), "seconds": time.perf_counter() - start}


def engine_smoke(device: str, max_tokens: int = 8, graphs: str = "auto") -> dict:
    """Greedy generation on a seeded tiny model (head dim 16: the kernels' smallest) with no speculation,
    with fixed:3 from an oracle drafter and from a seeded random DSpark drafter (its block forward through
    the drafter's step graphs), step graphs as ``graphs`` says (auto: on CUDA), and once more with every
    step eager: the finish reasons of every request, the steps the graphs served, and a failure when any
    run's tokens differ from the eager run's or CUDA served no graph step (target or drafter)."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.testing.oracle import OracleDrafter
    from sparkserve.testing.tiny import random_dspark, tiny_target

    result: dict = {"status": "ok", "device": device}
    prompts = [[(5 * i + 3) % 61 for i in range(n)] for n in (40, 7, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for run in ("none", "fixed:3", "dspark fixed:3", "none eager"):  # graphs as configured (CUDA: replays)
        policy = run.split()[-1] if run.startswith("dspark") else run.split()[0]
        try:
            target = tiny_target(seed=4, head_dim=16)
            target.model.to(device)
            drafter = None if policy == "none" else (
                random_dspark(target, block_size=3, seed=2).to(device) if run.startswith("dspark")
                else OracleDrafter(target, block_size=3, seed=1, error_rate=0.5))
            args = EngineArgs(dtype="float32", device=device, num_kv_blocks=64, block_size=16, max_num_seqs=4,
                              max_num_batched_tokens=32, drafter=None if drafter else "none",
                              verify_policy=None if policy == "none" else policy,
                              attention_backend="triton" if graphs == "on" else "auto", warm_up_kernels=False,
                              cuda_graphs="off" if run.endswith("eager") else graphs)
            core = EngineCore(args, loaded=target, drafter=drafter)
            result[run] = smoke_outcome(core, prompts, params)
        except Exception as exc:  # noqa: BLE001 - recorded per run
            result[run] = {"error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
        if "error" in result[run] or result[run]["finish_errors"]:
            result["status"] = "failed"
    if result["status"] == "ok" and (
            any(result[run]["tokens"] != result["none eager"]["tokens"] for run in ("none", "fixed:3", "dspark fixed:3"))
            or (device == "cuda" and not (result["none"]["graph_replays"] and result["dspark fixed:3"]["draft_graph_replays"]))):
        result["status"] = "failed"  # graph steps must be served (target and drafter), with the eager steps' tokens
    return result


def smoke_outcome(core, prompts: list[list[int]], params) -> dict:
    """Run ``prompts`` to the end; their tokens, finish reasons and how many finished with ``error``."""
    from sparkserve.testing.engine_run import run_to_end

    run = run_to_end(core, prompts, params, prefix="smoke")
    graphs, draft_graphs = core.runner.graphs, core.runner.draft_graphs
    return {"tokens": run.tokens, "finish_reasons": run.finish_reasons, "finish_errors": run.num_errors,
            "graph_replays": None if graphs is None else graphs.replays,
            "draft_graph_replays": None if draft_graphs is None else draft_graphs.replays}


# ---------------------------------------------------------------- phase 1: tests


def phase_tests(args: argparse.Namespace, deadline: Deadline) -> dict:
    out = Path(args.out) / "phase1_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernels.py",
           f"--junitxml={out}"]
    if getattr(args, "tests_marker", None):  # window 1: the CUDA-only cases, stop at the first failure
        cmd += ["-m", args.tests_marker, "-x"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(deadline.left(), 1))
    except subprocess.TimeoutExpired as exc:
        return {"status": "timeout", "stdout_tail": (exc.stdout or "")[-4000:] if isinstance(exc.stdout, str) else ""}
    result = {"status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
              "stdout_tail": proc.stdout[-4000:]}
    if out.exists():
        result.update(junit_summary(out))
        out.unlink()
    return result


def junit_summary(path: Path) -> dict:
    """Counts, failures and per-test durations from a pytest junit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        cases.append({"name": case.get("name"), "outcome": kind, "seconds": float(case.get("time", 0)),
                      "message": message[:1000]})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "cases": cases}


# ---------------------------------------------------------------- phase 2: kernel microbenchmarks


def phase_kernels(args: argparse.Namespace, deadline: Deadline) -> dict:
    from sparkserve.benchmarks import bench_kernels as bench

    return bench.run_benchmarks(deadline.left)


# ---------------------------------------------------------------- phase 3: serving


def engine_is_wired() -> str | None:
    """None when ``EngineArgs`` has a ``device`` field, else why phase 3 / 4b cannot run."""
    from sparkserve.engine.config import EngineArgs

    if "device" not in {f.name for f in dataclasses.fields(EngineArgs)}:
        return "not wired: EngineArgs has no device field yet (issue 13 device placement)"
    return None


def model_path() -> str | None:
    """``$SPARKSERVE_MODEL_PATH`` (the GGUF reassembled by gpu_check.sh), else None (the embedded model)."""
    return os.environ.get("SPARKSERVE_MODEL_PATH") or None


KV_CACHE_GB = 8.0  # per engine; engines are built one at a time and freed (``free_core``) before the next


def free_core(core) -> None:
    """Drop an engine and return its KV cache to the device before the next one is built."""
    import gc

    import torch

    del core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_core(policy: str, dtype: str = "bfloat16", max_num_seqs: int = 256):
    """An engine on CUDA: no drafter for policy "none", else the shipped DSpark drafter (named explicitly:
    with ``--model PATH`` the engine picks no default drafter) with its default draft vocabulary."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.engine.spec_decode.factory import SHIPPED_DRAFT_VOCAB, shipped_drafter_path

    drafter = "none"
    if policy != "none":
        path = shipped_drafter_path()
        if path is None:
            raise FileNotFoundError("the shipped DSpark drafter is not in engine/spec_decode/weights")
        drafter = str(path)
    args = EngineArgs(model=model_path(), device="cuda", dtype=dtype, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=4096, kv_cache_memory_gb=KV_CACHE_GB, drafter=drafter,
                      draft_vocab_size=None if policy == "none" else SHIPPED_DRAFT_VOCAB,
                      verify_policy=None if policy == "none" else policy)
    return EngineCore(args)


def serve_level(core, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """``concurrency`` requests at once, each ``max_tokens`` tokens (EOS ignored); tok/s numbers."""
    from sparkserve.scheduler.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first, done, counts, reasons = {}, {}, {}, {}
    for i in range(concurrency):
        rid = f"c{concurrency}-{i}"
        core.add_request(core.make_request(rid, prompts[i % len(prompts)], params))
        counts[rid] = 0
    while core.has_unfinished_requests():
        outputs = core.step()
        now = time.perf_counter()
        for out in outputs:
            counts[out.request_id] += len(out.new_token_ids)
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
                reasons[out.request_id] = str(out.finish_reason)
    wall = time.perf_counter() - start
    errors = sum("error" in r for r in reasons.values())
    decode_rates = [(counts[r] - 1) / (done[r] - first[r]) for r in counts if done[r] > first[r]]
    return {"concurrency": concurrency, "finish_errors": errors, "status": "ok" if errors == 0 else "failed",
            "finish_reasons": sorted(set(reasons.values())), "wall_s": wall, "output_tokens": sum(counts.values()),
            "output_tok_s": sum(counts.values()) / wall,
            "per_user_tok_s": sum(decode_rates) / max(len(decode_rates), 1),
            "mean_ttft_s": sum(first[r] - start for r in counts) / len(counts)}


def graph_vs_eager(core, batches: tuple[int, ...] = (1, 4, 16, 64, 256), rounds: int = 5) -> list[dict]:
    """Decode step seconds (B = R, ``make_step_fn``, synchronised) through the step graphs and eager, alternated
    A/B per round (medians); ``speedup`` = eager / graph. Batches past ``max_num_seqs`` are left out."""
    import statistics

    from sparkserve.engine.throughput_probe import make_step_fn

    served = make_step_fn(core.runner, core.num_blocks)
    eager = make_step_fn(core.runner, core.num_blocks, use_graphs=False)
    rows = []
    for batch in batches:
        if batch > core.args.max_num_seqs:
            continue
        served(batch, batch), eager(batch, batch)  # warm-up: compilation, graph capture
        times: dict[str, list[float]] = {"graph": [], "eager": []}
        for _ in range(rounds):
            times["graph"].append(served(batch, batch))
            times["eager"].append(eager(batch, batch))
        graph_s, eager_s = statistics.median(times["graph"]), statistics.median(times["eager"])
        rows.append({"batch": batch, "graph_s": graph_s, "eager_s": eager_s, "speedup": eager_s / graph_s,
                     "graphs": core.runner.graphs is not None})
    return rows


def staircase(core, requests: tuple[int, ...] = (1, 16, 64, 256), max_tokens: int = 2048) -> list[dict]:
    """Step seconds of synthetic steps SPS(B, R) (engine/throughput_probe.make_step_fn), B = R * (1 + l)."""
    import torch

    from sparkserve.engine.throughput_probe import make_step_fn

    step = make_step_fn(core.runner, core.num_blocks)
    rows = []
    for r in requests:
        for drafts in (0, 1, 3, 7):
            b = r * (1 + drafts)
            if b > max_tokens:
                continue
            step(b, r)  # warm-up (compilation, graph capture)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(b, r)
            torch.cuda.synchronize()
            rows.append({"batch_tokens": b, "requests": r, "step_s": time.perf_counter() - t0})
    return rows


def phase_serving(args: argparse.Namespace, deadline: Deadline) -> dict:
    import torch

    reason = engine_is_wired()
    if reason is not None:
        return {"status": reason}
    prompts = serving_prompts()
    result = {"status": "ok", "cells": [], "staircase": {}, "errors": {}}
    for policy in args.policies:
        if deadline.left() < 30:
            result["status"] = "partial (budget)"
            break
        try:
            serve_policy(policy, prompts, args, deadline, result)
        except Exception as exc:  # noqa: BLE001 - one policy's error keeps the cells already measured
            result["errors"][policy] = {"error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
        torch.cuda.empty_cache()
    if result["errors"] or any(c["status"] != "ok" for c in result["cells"]):
        result["status"] = "failed"
    return result


def serve_policy(policy: str, prompts: list[list[int]], args: argparse.Namespace, deadline: Deadline,
                 result: dict) -> None:
    """One policy's cells (appended as each ends) and its staircase."""
    core = make_core(policy)
    result.setdefault("graph_memory", {})[policy] = guarded(lambda: graph_memory_check(core))
    serve_level(core, prompts[:4], 4, 8)  # warm-up
    for c in args.concurrency:
        if deadline.left() < 15:
            result["status"] = "partial (budget)"
            break
        result["cells"].append({"policy": policy, **serve_level(core, prompts, c, args.max_tokens)})
    if policy == "none" and deadline.left() > 20:
        result["graph_vs_eager"] = graph_vs_eager(core)
    result["staircase"][policy] = staircase(core)
    free_core(core)


def graph_memory_check(core) -> dict:
    """The step graphs' reserve as the KV-cache sizing estimates it (engine/graph_memory.py, from this
    device's activation peak) against what their capture took before ready (``graph_memory_bytes``), bytes."""
    from sparkserve.engine.graph_memory import engine_graph_shapes, graph_reserve
    from sparkserve.engine.throughput_probe import activation_peak_bytes

    args, runner = core.args, core.runner
    dtype = runner.kv_caches[0][0].dtype
    peak = activation_peak_bytes(core.loaded.model, args.max_num_batched_tokens, dtype, core.device)
    shapes = engine_graph_shapes(core.loaded.config, args.block_size, args.max_num_seqs, core.max_model_len, dtype,
                                 core.drafter)
    reserve = graph_reserve(shapes, peak, args.max_num_batched_tokens)
    return {"estimated_bytes": reserve.total, **dataclasses.asdict(reserve), "measured_bytes": runner.graph_memory_bytes,
            "activation_peak_bytes": peak, "keys": sum(len(s.keys) for s in shapes)}


def serving_prompts(limit: int = 256) -> list[list[int]]:
    """MT-bench first turns as chat-templated token ids (synthetic text when the file is absent)."""
    from sparkserve.engine.loader import default_model_path
    from sparkserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path() or default_model_path())
    try:
        from sparkserve.loadtests.prompts import load_prompts

        texts = load_prompts("mt_bench")
    except (FileNotFoundError, KeyError):
        texts = [f"Write a short story about the number {i}." for i in range(80)]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts[:limit]]


# ---------------------------------------------------------------- phase 4: exactness


def phase_exactness(args: argparse.Namespace, deadline: Deadline) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from sparkserve.benchmarks.bench_kernels import kernel_exactness

    result = {"status": "ok", "kernel": kernel_exactness()}
    result["seeded"] = seeded_exactness("cuda", SEEDED_SHAPES, num_prompts=3, max_tokens=8, deadline=deadline)
    if result["seeded"]["status"] != "ok":
        result["status"] = "failed"
    if model_path() is not None and deadline.left() > 30:  # the carried GGUF (window 3's staging)
        result["engine"] = engine_exactness(deadline)
    return result


# (layers, hidden, intermediate, heads, kv heads, head dim, vocab, qk norm, tied): the served shapes
SEEDED_SHAPES = {"smollm2-135m": (30, 576, 1536, 9, 3, 64, 49152, False, True),
                 "qwen3-0.6b": (28, 1024, 3072, 16, 8, 128, 151936, True, True)}
DRY_SHAPES = {"tiny-smollm2": (2, 48, 64, 3, 1, 16, 61, False, True), "tiny-qwen3": (2, 64, 96, 4, 2, 16, 67, True, True)}


def seeded_exactness(device: str, shapes: dict, num_prompts: int = 4, max_tokens: int = 16,
                     deadline: Deadline | None = None) -> dict:
    """fp32 greedy tokens of the engine on ``device`` (no speculation, fixed:3 with an oracle drafter) vs the
    CPU's full-recomputation reference on the same seeded random weights, by the near-tie rule."""
    import copy
    import types

    import torch

    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.engine.loader import LoadedModel
    from sparkserve.engine.models.config import ModelConfig
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.testing.engine_run import run_to_end
    from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
    from sparkserve.testing.oracle import OracleDrafter
    from sparkserve.testing.reference import greedy_reference
    from sparkserve.testing.tiny import random_llama

    result: dict = {"status": "ok", "device": device}
    for name, (layers, hidden, inter, heads, kv_heads, head_dim, vocab, qk_norm, tied) in shapes.items():
        if deadline is not None and deadline.left() < 20:  # a 0.6B-shaped CPU reference takes ~10-20 s
            result[name] = {"status": "skipped (budget)"}
            continue
        config = ModelConfig(
            architecture="qwen3" if qk_norm else "llama", vocab_size=vocab, hidden_size=hidden,
            intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
            rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=tied, attention_bias=False,
            qk_norm=qk_norm, bos_token_id=None, eos_token_id=None)
        cpu_model = random_llama(config, seed=7, scale=hidden**-0.5)
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 23, 40, 9)][:num_prompts]
        refs = [greedy_reference(cpu_model, p, max_tokens).token_ids for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        cell = {}
        for policy in ("none", "fixed:3"):
            tokenizer = types.SimpleNamespace(eos_token_id=None, stop_token_ids=(), bos_token_id=None)
            target = LoadedModel(copy.deepcopy(cpu_model).to(device), config, tokenizer, name)
            drafter = OracleDrafter(target, block_size=3, seed=1, error_rate=0.5) if policy != "none" else None
            core = EngineCore(EngineArgs(dtype="float32", device=device, num_kv_blocks=64, block_size=16,
                                         max_num_seqs=4, max_num_batched_tokens=64,
                                         drafter=None if drafter else "none",
                                         verify_policy=None if policy == "none" else policy,
                                         warm_up_kernels=False),
                              loaded=target, drafter=drafter)
            run = run_to_end(core, prompts, params, prefix=policy)
            verdicts = []
            for p, o, r in zip(prompts, run.tokens, refs, strict=True):
                try:
                    same = assert_same_or_near_tie(o, r, top2_gap_fn(cpu_model, p, r))
                    verdicts.append("identical" if same else "near-tie")
                except AssertionError as exc:
                    verdicts.append(f"FAIL: {str(exc)[:300]}")
            cell[policy] = {"verdicts": verdicts, "finish_errors": run.num_errors}
            if run.num_errors or any(v.startswith("FAIL") for v in verdicts):
                result["status"] = "failed"
        result[name] = cell
    return result


def engine_exactness(deadline: Deadline, num_prompts: int = 8, max_tokens: int = 32) -> dict:
    """Greedy fp32 outputs on CUDA (no speculation, fixed:7) vs the CPU fp32 reference (near-tie rule)."""
    import torch

    from sparkserve.engine.loader import load_model
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
    from sparkserve.testing.reference import greedy_reference

    model = load_model(model_path(), dtype=torch.float32)  # on the CPU: the reference
    prompts = serving_prompts(num_prompts)
    stops = set(model.tokenizer.stop_token_ids)
    refs = [greedy_reference(model.model, p, max_tokens, stops).token_ids for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=tuple(stops))
    result = {}
    for policy in ("none", "fixed:7"):
        if deadline.left() < 20:
            result[policy] = {"status": "skipped (budget)"}
            continue
        outputs = make_core(policy, dtype="float32", max_num_seqs=16).generate_batch(prompts, params)
        verdicts = []
        for p, o, r in zip(prompts, outputs, refs, strict=True):
            try:
                verdicts.append("identical" if assert_same_or_near_tie(o, r, top2_gap_fn(model.model, p, r)) else "near-tie")
            except AssertionError as exc:
                verdicts.append(f"FAIL: {exc}")
        result[policy] = {"verdicts": verdicts, "pass": not any(v.startswith("FAIL") for v in verdicts)}
    return result


RUNNERS: dict[str, Callable[[argparse.Namespace, Deadline], dict]] = {
    "probe": phase_probe, "tests": phase_tests, "kernels": phase_kernels, "serving": phase_serving, "exactness": phase_exactness,
}
DRY_RUNNERS: dict[str, Callable[[argparse.Namespace, Deadline], dict]] = {
    "probe": phase_probe,
    "exactness": lambda a, d: _status_of(seeded_exactness("cpu", DRY_SHAPES, num_prompts=2, max_tokens=6)),
}


def _status_of(seeded: dict) -> dict:
    return {"status": seeded["status"], "seeded": seeded}


PLANS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "probe": lambda a: {"checks": ["c_compiler", "shared_memory", "trivial_kernel"],
                        "smoke": ["none", "fixed:3", "none eager"]},
    "tests": lambda a: {"command": "python -m pytest -q tests/kernels/test_kernels.py"},
    "kernels": lambda a: {"decode_batches": [32, 64, 128, 256], "contexts": [2048, 4096, 8192], "verify_q_len": 8},
    "serving": lambda a: {"policies": a.policies, "concurrency": a.concurrency, "max_tokens": a.max_tokens,
                          "graph_vs_eager_batches": [1, 4, 16, 64, 256]},
    "exactness": lambda a: {"kernel": "fp32 mixed batch", "engine": ["none", "fixed:7"]},
}


def run_phase(name: str, args: argparse.Namespace, cuda: bool) -> dict:
    """One phase's JSON: its plan, then its result or why it did not run. A dry run runs the phases that
    have a CPU form (``DRY_RUNNERS``: the probe, exactness at tiny shapes) and writes the others' plans."""
    result: dict = {"phase": name, "plan": PLANS[name](args)}
    start = time.perf_counter()
    runner = DRY_RUNNERS.get(name) if args.dry_run else RUNNERS[name]
    if name in args.skip:
        result["status"] = "skipped (--skip)"
    elif args.dry_run and runner is None:
        result["status"] = "dry-run"
    elif not cuda and not args.dry_run:
        result["status"] = "skipped: CUDA is not available"
    else:
        try:
            result.update(runner(args, Deadline(getattr(args, f"budget_{name}"))))
        except Exception as exc:  # a failed phase must not stop the later ones
            result.update(status="error", error=repr(exc), traceback=traceback.format_exc()[-4000:])
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the phases in order; returns 0 unless a phase failed or errored."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    summary = {"environment": guarded(environment), "staged": guarded(lambda: stage_carried_files(ROOT)), "phases": {}}
    write_json(out / "summary.json", summary)
    for index, name in enumerate(PHASES):
        print(f"[gpu_check] phase {index} {name} ...", flush=True)
        result = run_phase(name, args, torch.cuda.is_available())
        write_json(out / f"phase{index}_{name}.json", result)
        summary["phases"][name] = {"status": result["status"], "wall_s": result["wall_s"]}
        write_json(out / "summary.json", summary)
        print(f"[gpu_check] phase {index} {name}: {result['status']} ({result['wall_s']:.1f} s)", flush=True)
    bad = [s["status"] for s in summary["phases"].values() if s["status"] in ("failed", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
