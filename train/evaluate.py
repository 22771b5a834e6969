"""``eval-drafter`` and the held-out calibration job.

Prompts: the first turn of MT-bench, HumanEval and GSM8K test (../shared/data/prompts) as one user message
with the model's template; ``num_prompts`` per set chosen by ``random.Random(seed).shuffle``; prompt
wrappers as DeepSpec's evaluator (math: "Please reason step by step..."; HumanEval: solution request
around the prompt in a python fence). Speculation runs through ``sparkserve.train.spec_eval.run_spec_decode`` (the
serving rejection rule over the target's paged forward) until the engine exposes speculation counters;
greedy outputs there are identical to non-speculative decoding (tests/train/test_train.py).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparkserve.train.calibrate import fit_temperatures, write_temperatures
from sparkserve.train.data import (
    MAX_PROMPT_TOKENS,
    chat_prompt_ids,
    read_samples,
    select_prompts,
    split_holdout,
)
from sparkserve.train.drafters import load_any_drafter
from sparkserve.train.metrics import (
    calibration_report,
    reliability_bins,
    repetition_share,
    survival_by_position,
)
from sparkserve.train.spec_eval import SpecResult, run_spec_decode

if TYPE_CHECKING:  # engine.loader needs the gguf package, which the GPU machine lacks
    from sparkserve.engine.loader import LoadedModel

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def load_eval_prompts(prompts_dir: str | Path | None, num: int, seed: int) -> dict[str, list[str]]:
    """{dataset: prompt texts}: mt_bench, humaneval, gsm8k."""
    folder = Path(prompts_dir) if prompts_dir else DEFAULT_PROMPTS_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"evaluation prompts not found in {folder}; pass --prompts-dir")
    rows = {
        "mt_bench": [json.loads(x)["turns"][0] for x in (folder / "mt_bench_question.jsonl").read_text().splitlines()],
        "humaneval": [
            "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
            + json.loads(x)["prompt"] + "\n```"
            for x in gzip.decompress((folder / "HumanEval.jsonl.gz").read_bytes()).decode().splitlines() if x],
        "gsm8k": [json.loads(x)["question"] + MATH_SUFFIX for x in (folder / "gsm8k_test.jsonl").read_text().splitlines()],
    }
    for texts in rows.values():
        random.Random(seed).shuffle(texts)
    return {name: texts[:num] for name, texts in rows.items()}


def _run(loaded: LoadedModel, drafter, prompts: list[list[int]], max_new: int, temp: float, seed: int,
         batch: int) -> SpecResult:
    """run_spec_decode in batches of ``batch`` prompts, merged."""
    merged = SpecResult([])
    logits = []
    for i in range(0, len(prompts), batch):
        res = run_spec_decode(loaded.model, drafter, prompts[i:i + batch], max_new, temp,
                              set(loaded.tokenizer.stop_token_ids), seed + i)
        merged.outputs += res.outputs
        merged.accept_lengths += res.accept_lengths
        merged.num_drafted += res.num_drafted
        merged.num_accepted += res.num_accepted
        if res.conf_logits is not None:
            logits.append(res.conf_logits)
    merged.conf_logits = torch.cat(logits) if logits else None
    return merged


def engine_run(loaded: LoadedModel, path: str, prompts: list[list[int]], max_new: int, temp: float,
               seed: int) -> dict | None:
    """tau and prefix survival through the real engine (serving's scheduler, runner, drafter and
    rejection sampler) from the steps' stats records (``SpecDecodingStats``): tau = 1 + accepted / verify rounds; survival at k
    = drafts accepted at position k / rounds that verified position k (DeepSpec accept_rate@k)."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.scheduler.stats import SpecDecodingStats

    kind = "dspark" if _load(loaded, path).confidence_head is not None else "dflash"
    try:
        core = EngineCore(EngineArgs(drafter=path, drafter_kind=kind, max_num_seqs=len(prompts),
                                     verify_policy="fixed:7", seed=seed), loaded=loaded)
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return None
    params = SamplingParams(temperature=temp, max_tokens=max_new, seed=seed,
                            stop_token_ids=tuple(loaded.tokenizer.stop_token_ids))
    steps: list = []
    outputs = core.generate_batch(prompts, params, request_prefix="eval", steps=steps)
    stats = SpecDecodingStats.merge(core.num_speculative_tokens, (s.scheduler.spec_decoding for s in steps))
    drafted, accepted = list(stats.num_verified_per_pos), list(stats.num_accepted_per_pos)
    surv = [a / d if d else None for a, d in zip(accepted, drafted, strict=True)]
    return {"tau": stats.accepted_length, "rounds": stats.num_drafts, "survival": surv,
            "repetition_share": sum(repetition_share(o) for o in outputs) / max(1, len(outputs)),
            "backend": "engine"}


def _load(loaded: LoadedModel, path: str | Path):
    w = loaded.model.embed_tokens.weight
    return load_any_drafter(path, w, loaded.model.lm_head_weight, dtype=w.dtype, device=w.device)


def _calibration_for(config, greedy: bool) -> list[float] | None:
    """The temperature vector the engine applies to requests of this kind (None = uncalibrated)."""
    temps = (config.confidence_temperatures_greedy if greedy else None) or config.confidence_temperatures
    return list(temps) if temps else None


def summarize(res: SpecResult, block_size: int, temperatures: list[float] | None) -> dict:
    """tau, survival / conditional acceptance by position, repetition, calibration before / after."""
    surv, cond = survival_by_position(res.num_accepted, res.num_drafted, block_size)
    out = {"tau": res.tau, "rounds": res.num_rounds, "tokens": sum(len(o) for o in res.outputs),
           "survival": surv, "conditional": cond,
           "repetition_share": sum(repetition_share(o) for o in res.outputs) / max(1, len(res.outputs))}
    if res.conf_logits is not None:
        out["calibration_raw"] = calibration_report(res.conf_logits, res.labels, res.num_drafted)
        if temperatures:
            out["calibration_sts"] = calibration_report(res.conf_logits, res.labels, res.num_drafted, temperatures)
    return out


def evaluate(loaded: LoadedModel, drafters: dict[str, str], out_dir: str | Path, prompts_dir: str | None,
             num_prompts: int, max_new: int, temperatures: list[float], seed: int, batch: int,
             backend: str = "offline") -> dict:
    """Evaluate every drafter on every dataset and temperature; writes report.json and PNG plots.

    ``backend="engine"`` also measures tau and survival through the serving engine (same scheduler,
    runner and rejection sampler as ``sparkserve serve``, ``fixed:7``), reported under ``engine``;
    drafters the engine cannot load (the AR baseline) are skipped there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_eval_prompts(prompts_dir, num_prompts, seed)
    prompts = {name: [chat_prompt_ids(loaded.tokenizer, t) for t in ts] for name, ts in texts.items()}
    report: dict = {"tau": {}, "detail": {}, "num_prompts": num_prompts, "max_new_tokens": max_new,
                    "backend": "offline (train/spec_eval.py)"}
    reliability = {}
    for name, path in drafters.items():
        drafter = _load(loaded, path)
        for temp in temperatures:
            temps = _calibration_for(drafter.config, greedy=temp < 1e-5)
            for ds, ids in prompts.items():
                res = _run(loaded, drafter, ids, max_new, temp, seed, batch)
                key = f"{name}/{ds}/T={temp:g}"
                report["detail"][key] = summarize(res, drafter.config.block_size, temps)
                report["tau"][key] = round(res.tau, 4)
                if res.conf_logits is not None and temp == 1.0 and ds == "mt_bench":
                    reliability[name] = (reliability_bins(res.conf_logits, res.labels, res.num_drafted),
                                         reliability_bins(res.conf_logits, res.labels, res.num_drafted, temps))
    if backend == "engine":
        report["engine"] = {}
        for name, path in drafters.items():
            for temp in temperatures:
                for ds, ids in prompts.items():
                    res = engine_run(loaded, path, ids, max_new, temp, seed)
                    if res is not None:
                        report["engine"][f"{name}/{ds}/T={temp:g}"] = res
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plots(report, reliability, out)
    return report


def _plots(report: dict, reliability: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, detail in report["detail"].items():
        ax.plot(range(len(detail["survival"])), [s or 0 for s in detail["survival"]], marker="o", label=key)
    ax.set_xlabel("draft position k"), ax.set_ylabel("prefix survival (accept_rate@k)")
    ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "acceptance_by_position.png", dpi=120)
    plt.close(fig)
    if reliability:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for name, (raw, cal) in reliability.items():
            ax.plot([b[0] for b in raw], [b[1] for b in raw], "o-", label=f"{name} raw")
            ax.plot([b[0] for b in cal], [b[1] for b in cal], "s-", label=f"{name} STS")
        ax.set_xlabel("predicted survival a_k"), ax.set_ylabel("observed survival (T=1)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "reliability_diagram.png", dpi=120)
        plt.close(fig)


def _holdout_prompts(loaded: LoadedModel, data: str, num_prompts: int, holdout: float, seed: int) -> list[list[int]]:
    """Prompt ids never trained on. ``data``: a gen-data folder (its hash-held-out split, ``holdout``
    fraction), or ``PROMPTS.jsonl@N`` (a train-prompts file: the ``num_prompts`` prompts that follow the
    first N of ``select_prompts``' order under ``seed``, i.e. a gen-data run of N prompts never saw them;
    prompts over MAX_PROMPT_TOKENS skipped, as gen-data skips them).
    Raises ValueError when nothing is held out."""
    if "@" in data and data.rsplit("@", 1)[1].isdigit():
        path, skip = data.rsplit("@", 1)
        seen = {r["id"] for r in select_prompts(path, int(skip), seed)}
        rows = [r for r in select_prompts(path, int(skip) + 2 * num_prompts, seed) if r["id"] not in seen]
        prompts = [ids for ids in (chat_prompt_ids(loaded.tokenizer, r["prompt"]) for r in rows)
                   if len(ids) <= MAX_PROMPT_TOKENS][:num_prompts]
    else:
        _, held = split_holdout(read_samples(data), holdout, seed)
        prompts = [s.ids[:s.loss_start] for s in held[:num_prompts]]
    if not prompts:
        raise ValueError(f"no held-out prompts in {data} (holdout fraction {holdout})")
    return prompts


def calibrate_on_holdout(loaded: LoadedModel, drafter_dir: str, data: str, num_prompts: int, max_new: int,
                         holdout: float, seed: int, batch: int) -> dict:
    """Fit STS temperatures on held-out training prompts at T = 1 (sampled requests) and at T = 0 (greedy
    requests), store both in the drafter's config.json, and report ECE / AUC / Brier before and after
    at both temperatures, each with its own vector and with the other one (does serving need both?)."""
    prompts = _holdout_prompts(loaded, data, num_prompts, holdout, seed)
    drafter = _load(loaded, drafter_dir)
    if drafter.confidence_head is None:
        raise ValueError(f"{drafter_dir} has no confidence head to calibrate")
    drafter.config = dataclasses.replace(drafter.config, confidence_temperatures=None,
                                         confidence_temperatures_greedy=None)
    runs = {t: _run(loaded, drafter, prompts, max_new, t, seed, batch) for t in (1.0, 0.0)}
    fits = {t: fit_temperatures(res.conf_logits, res.labels, res.num_drafted) for t, res in runs.items()}
    write_temperatures(drafter_dir, fits[1.0], fits[0.0])
    report = {"temperatures": fits[1.0], "temperatures_greedy": fits[0.0], "held_out_prompts": len(prompts)}
    for t, res in runs.items():
        other = fits[0.0 if t == 1.0 else 1.0]
        report[f"T={t:g}"] = {"tau": res.tau, "rounds": res.num_rounds,
                              "before": calibration_report(res.conf_logits, res.labels, res.num_drafted)["summary"],
                              "after": calibration_report(res.conf_logits, res.labels, res.num_drafted,
                                                          fits[t])["summary"],
                              "after_other_temperature_fit": calibration_report(
                                  res.conf_logits, res.labels, res.num_drafted, other)["summary"]}
    (Path(drafter_dir) / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
