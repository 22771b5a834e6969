"""Diagnosis of the load-aware policy (issue 25): per step, what the policy predicted against what happened.

In-process engines (no HTTP), a fresh one per cell (no warm calibration; the loaded target and the start-up
profile of an engine at the default ``max_num_seqs``, as a served default has, are shared, so a cell pays no
model load and no profile measurement): for each prompt set and concurrency c, the default engine (DSpark drafter,
dspark policy; ``--engine-args`` changes it) and a plain one (``--drafter none``) run the same prompts, at
most c at once, alternating A/B per repetition; ``--temperature`` > 0 samples with the same per-request
seeds in both arms. Throughput is tokens over the seconds spent inside ``EngineCore.step()`` (both arms
timed alike; the recorder's bookkeeping between steps is not). For every step of
the default engine it records B, R, the measured step time, the time the policy's profile predicted for
that step (with the drafting gate's cost) and for a plain step of the same R, the expected tokens E of
the plan against the realised ones (R + accepted drafts), the drafter's profiled share, and the gate's
choice. With ``--trace`` the steps of one cell (profile, per request stated confidences, l_r, accepted)
are written for the replay tests (tests/scheduler/policy/data/).

    python -m sparkserve.benchmarks.bench_guard --sets mtbench+gsm8k --concurrency 1 4 16 --num-prompts 8 \\
        --out bench_results/guard_diagnosis.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from sparkserve.benchmarks.bench_step_breakdown import machine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import LoadedModel
from sparkserve.loadtests.prompts import load_prompts
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.scheduler.profile.grid import drafting_step_time
from sparkserve.scheduler.sampling_params import SamplingParams


def prompt_set(spec: str, n: int) -> list[str]:
    """``a+b``: alternate the sets' prompts (``specbench:summarization`` = Spec-Bench's category)."""
    sets = [load_prompts(s.replace("specbench", "spec_bench").replace("mtbench", "mt_bench")) for s in spec.split("+")]
    return [sets[i % len(sets)][i // len(sets)] for i in range(n)]


class Recorder:
    """Wraps the controller's hooks to keep what the policy knew when it decided, per step."""

    def __init__(self, core: EngineCore) -> None:
        self.core, self.ctrl = core, core.controller
        self.pending: dict = {}
        real_verify, real_gate = self.ctrl.verify_lengths, self.ctrl.select_drafting

        def verify_lengths(requests, budget_left, context):
            lengths = real_verify(requests, budget_left, context)
            plan = self.ctrl.last_plan
            self.pending.update(expected=plan.expected_tokens if plan is not None else None, requests={
                r.request_id: {"stated": list(r.drafts.confidences),
                               "corrected": list(self.ctrl.corrected(r.drafts.drafter, r, r.drafts.confidences)),
                               "l": n, "greedy": r.sampling_params.greedy} for r, n in zip(requests, lengths, strict=True)})
            return lengths

        def select_drafting(requests, context):
            flags = real_gate(requests, context)
            self.pending["gate"] = [bool(f) for f in flags]
            return flags

        self.ctrl.verify_lengths, self.ctrl.select_drafting = verify_lengths, select_drafting

    def step_record(self, predicted: float, predicted_plain: float, draft_share: float) -> dict:
        step = self.core.last_step
        stats = step.scheduler
        spec = stats.spec_decoding
        reqs = self.pending.get("requests", {})
        for d in spec.drafts if spec is not None else ():
            if d.request_id in reqs:
                reqs[d.request_id]["accepted"] = d.num_accepted_tokens
        accepted = spec.num_accepted_tokens if spec is not None else 0
        rec = {"B": stats.num_batched_tokens, "R": stats.num_decode_requests, "drafting": stats.num_drafting,
               "duration_s": step.duration_s, "predicted_s": predicted, "predicted_plain_s": predicted_plain,
               "draft_share_s": draft_share, "expected": self.pending.get("expected"),
               "realised": stats.num_decode_requests + accepted, "verify_tokens": spec.num_draft_tokens if spec else 0,
               "gate": self.pending.get("gate"), "requests": reqs}
        self.pending = {}
        return rec


def request_params(n: int, max_tokens: int, temperature: float, seed: int) -> list[SamplingParams]:
    """Per prompt: greedy at T = 0; at T > 0 seeded sampling (prompt i of repetition ``seed``: 1000 seed + i),
    so both arms sample the same streams."""
    return [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True,
                           seed=1000 * seed + i if temperature > 0 else None) for i in range(n)]


def run_default(prompts: list[list[int]], max_tokens: int, seed: int, overrides: dict,
                concurrency: int = 0, loaded: LoadedModel | None = None, temperature: float = 0.0,
                profile: dict | None = None) -> tuple[float, int, list[dict], dict]:
    """One fresh default engine (``overrides``: EngineArgs fields; ``loaded`` and ``profile``: the target and the
    start-up profile shared by every engine of the run, each with its own online corrections and calibration,
    None: load / measure them) on all prompts, at most ``concurrency``
    running at once (0: all; the rest wait and are admitted as others finish). Returns (seconds inside
    ``step()``, tokens, step records, the start-up profile): the recorder's work between steps is not timed."""
    core = EngineCore(EngineArgs(seed=seed, max_num_seqs=concurrency or max(len(prompts), 1), **overrides), loaded,
                      profile=ThroughputProfile.from_dict(profile) if profile is not None else None)
    rec, ctrl = Recorder(core), core.controller
    for i, (p, params) in enumerate(zip(prompts, request_params(len(prompts), max_tokens, temperature, seed),
                                        strict=True)):
        core.add_request(core.make_request(f"r{i}", p, params))
    steps, tokens, elapsed = [], 0, 0.0
    while core.has_unfinished_requests():
        profile = ctrl.profile.current  # the policy's view before the step (the engine corrects it after)
        num_drafting, fraction = ctrl.last_num_drafting, ctrl.last_sampled_fraction
        start = time.perf_counter()
        outs = core.step()
        elapsed += time.perf_counter() - start
        tokens += sum(len(o.new_token_ids) for o in outs)
        if core.last_step is None:
            continue
        s = core.last_step.scheduler
        drafting = num_drafting if num_drafting is not None else s.num_decode_requests
        predicted = drafting_step_time(profile, s.num_batched_tokens, s.num_decode_requests, drafting, fraction)
        plain = drafting_step_time(profile, s.num_decode_requests, s.num_decode_requests, 0)
        steps.append(rec.step_record(predicted, plain, profile.draft_time(s.num_drafting)))
    guard = ctrl.guard.stats() if ctrl.guard is not None else None
    if guard is not None:
        steps.append({"guard": {"num_backoffs": guard.num_backoffs, "last_speedup": guard.last_speedup,
                                "plain_scale": guard.plain_scale}})
    base = ctrl.profile.base.to_dict()
    ctrl.close()
    return elapsed, tokens, steps, base


def run_plain(prompts: list[list[int]], max_tokens: int, seed: int, concurrency: int = 0,
              loaded: LoadedModel | None = None, temperature: float = 0.0) -> tuple[float, int, list[dict]]:
    """:func:`run_default` for ``--drafter none``: (seconds inside ``step()``, tokens, step records)."""
    core = EngineCore(EngineArgs(seed=seed, drafter="none", max_num_seqs=concurrency or max(len(prompts), 1)), loaded)
    for i, (p, params) in enumerate(zip(prompts, request_params(len(prompts), max_tokens, temperature, seed),
                                        strict=True)):
        core.add_request(core.make_request(f"r{i}", p, params))
    steps, tokens, elapsed = [], 0, 0.0
    while core.has_unfinished_requests():
        start = time.perf_counter()
        outs = core.step()
        elapsed += time.perf_counter() - start
        tokens += sum(len(o.new_token_ids) for o in outs)
        if core.last_step is not None:
            steps.append(core.last_step)
    return elapsed, tokens, [{"B": s.scheduler.num_batched_tokens, "R": s.scheduler.num_decode_requests,
                              "duration_s": s.duration_s} for s in steps]


def summarise(steps: list[dict], plain_steps: list[dict]) -> dict:
    """The terms of the diagnosis over the decode steps (no prefill in the step)."""
    guard = [s["guard"] for s in steps if "guard" in s]
    steps = [s for s in steps if "guard" not in s]
    dec = [s for s in steps if s["R"] and s["B"] <= s["R"] + s["verify_tokens"]]
    verify = [s for s in dec if s["verify_tokens"]]
    plain = [s for s in dec if not s["verify_tokens"]]
    med = statistics.median
    out: dict = {"decode_steps": len(dec), "verify_steps": len(verify), "guard": guard[0] if guard else None}
    if dec:
        out["profile_error_all"] = med(s["duration_s"] / s["predicted_s"] for s in dec)
    if verify:
        out["profile_error_verify"] = med(s["duration_s"] / s["predicted_s"] for s in verify)
        exp = [s for s in verify if s["expected"] is not None]
        out["expected_tokens_per_step"] = statistics.fmean(s["expected"] for s in exp) if exp else None
        out["realised_tokens_per_step"] = statistics.fmean(s["realised"] for s in exp) if exp else None
        out["verify_tokens_per_step"] = statistics.fmean(s["verify_tokens"] for s in verify)
        out["verify_tok_s_realised"] = sum(s["realised"] for s in verify) / sum(s["duration_s"] for s in verify)
        out["plain_tok_s_predicted_same_R"] = sum(s["R"] for s in verify) / sum(s["predicted_plain_s"] for s in verify)
    if plain:
        out["profile_error_plain_steps"] = med(s["duration_s"] / s["predicted_s"] for s in plain)
    pdec = [s for s in plain_steps if s["R"] and s["B"] == s["R"]]
    if pdec and dec:
        by_r = {}
        for s in pdec:
            by_r.setdefault(s["R"], []).append(s["duration_s"])
        matched = [(med(by_r[s["R"]]), s["predicted_plain_s"]) for s in dec if s["R"] in by_r]
        if matched:
            out["plain_profile_error"] = med(m / p for m, p in matched)
    out["drafter_share_of_step"] = med(s["draft_share_s"] / s["duration_s"] for s in dec) if dec else None
    out["gate_drafting_fraction"] = (sum(s["drafting"] for s in dec) / sum(s["R"] for s in dec)) if dec else None
    cal = [(c, int(r.get("accepted", 0) > k)) for s in verify for r in s["requests"].values()
           for k, c in enumerate(r["corrected"][: min(r.get("accepted", 0) + 1, r["l"])])]
    if cal:
        out["calibration_stated_mean"] = statistics.fmean(c for c, _ in cal)
        out["calibration_realised_mean"] = statistics.fmean(a for _, a in cal)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["mtbench+gsm8k"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="prompts per cell, at most c running at once (0: c prompts)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: seeded sampling, the same seeds in both arms")
    ap.add_argument("--repetitions", type=int, default=1)
    ap.add_argument("--engine-args", default="{}", help="JSON of EngineArgs fields for the default engine")
    ap.add_argument("--trace", action="append", default=[], metavar="SET:C:PATH",
                    help="write the steps of this cell as a trace (repeatable)")
    ap.add_argument("--out", default="bench_results/guard_diagnosis.json")
    args = ap.parse_args(argv)
    overrides = json.loads(args.engine_args)
    first = EngineCore(EngineArgs(**overrides))  # loads the target and its profile once: every engine shares them
    tokenizer, loaded = first.tokenizer, first.loaded
    profile = first.controller.profile.base.to_dict() if first.controller and first.controller.profile else None
    first.close()
    del first  # its KV cache: only the loaded target is kept
    cells = []
    for spec in args.sets:
        for c in args.concurrency:
            texts = prompt_set(spec, max(c, args.num_prompts))
            prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
            for rep in range(args.repetitions):
                order = ["default", "none"] if rep % 2 == 0 else ["none", "default"]
                res: dict = {"set": spec, "concurrency": c, "repetition": rep, "order": order}
                for name in order:
                    gc.collect()  # the recorder's hooks make cycles: free the last engine's KV cache first
                    if name == "default":
                        res["default_step_s"], res["default_tokens"], steps, used = run_default(
                            prompts, args.max_tokens, rep, overrides, c, loaded, args.temperature, profile)
                    else:
                        res["none_step_s"], res["none_tokens"], plain_steps = run_plain(
                            prompts, args.max_tokens, rep, c, loaded, args.temperature)
                res["ratio_tok_s"] = (res["default_tokens"] / res["default_step_s"]) / (res["none_tokens"] / res["none_step_s"])
                res.update(summarise(steps, plain_steps))
                print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}), flush=True)
                cells.append(res)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every cell: a cut-off run keeps them
                Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "cells": cells}, indent=1))
                for trace in args.trace:
                    if trace.rsplit(":", 2)[:2] != [spec, str(c)] or rep:
                        continue
                    Path(trace.rsplit(":", 1)[1]).write_text(json.dumps(
                        {"set": spec, "concurrency": c, "machine": machine(), "profile": used, "steps": steps,
                         "plain_steps": plain_steps}, separators=(",", ":")))


if __name__ == "__main__":
    main()
