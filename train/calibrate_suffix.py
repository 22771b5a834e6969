"""Fit the suffix drafter's per-position calibration (raw vote share -> conditional survival) on held-out
prompts, through the engine: the suffix drafter with the identity map proposes, ``fixed:K`` verifies every
draft at T = 0, and every reached position k (all drafts before it accepted) gives one observation
(raw c_k, accepted). Per position, observations are binned by raw confidence and fitted by isotonic
regression (``sparkserve.scheduler.policy.calibration.pool_adjacent_violators``); the knots are the bins' mean raw
confidences. The result is the shipped ``engine/spec_decode/weights/suffix_calibration.json``::

    python -m sparkserve.train.calibrate_suffix --num-prompts 96 --offset 6000 --max-tokens 160
"""

from __future__ import annotations

import argparse
import json

import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import load_model
from sparkserve.engine.spec_decode.suffix import DEFAULT_CALIBRATION, SuffixCalibration, SuffixDrafter
from sparkserve.scheduler.policy.calibration import pool_adjacent_violators
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.scheduler.stats import SpecDecodingStats
from sparkserve.train.data import DEFAULT_PROMPTS, chat_prompt_ids, select_prompts

NUM_BINS = 10


def collect(core: EngineCore, prompts: list[list[int]], max_tokens: int,
            gamma: int) -> tuple[list[list[tuple[float, bool]]], SpecDecodingStats]:
    """Per position, (raw confidence, accepted) of every reached draft position (from each step's stats
    record and the confidences the drafts were proposed with); and the run's speculation counts."""
    observations: list[list[tuple[float, bool]]] = [[] for _ in range(gamma)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for i, prompt in enumerate(prompts):
        core.add_request(core.make_request(f"calib-{i}", prompt, params))
    records = []
    while core.has_unfinished_requests():
        confidences = {r.request_id: r.drafts.confidences for r in core.scheduler.running_requests}
        core.step()
        spec = core.last_step.scheduler.spec_decoding if core.last_step is not None else None
        records.append(spec)
        for draft in spec.drafts if spec is not None else ():
            conf = confidences.get(draft.request_id, ())
            for k in range(min(draft.num_accepted_tokens + 1, draft.num_draft_tokens, len(conf))):
                observations[k].append((float(conf[k]), draft.num_accepted_tokens > k))
    return observations, SpecDecodingStats.merge(gamma, records)


def fit(observations: list[list[tuple[float, bool]]]) -> tuple[SuffixCalibration, list[int]]:
    """Isotonic map per position (positions without data reuse the previous one)."""
    knots, values, counts = [], [], []
    for obs in observations:
        bins: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(NUM_BINS)]  # n, sum raw, accepted
        for raw, ok in obs:
            b = min(int(raw * NUM_BINS), NUM_BINS - 1)
            bins[b][0] += 1
            bins[b][1] += raw
            bins[b][2] += ok
        used = [b for b in bins if b[0] > 0]
        counts.append(len(obs))
        if not used:
            if knots:
                knots.append(knots[-1])
                values.append(values[-1])
            continue
        rates = pool_adjacent_violators([b[2] / b[0] for b in used], [b[0] for b in used])
        knots.append(tuple(round(b[1] / b[0], 4) for b in used))
        values.append(tuple(round(r, 4) for r in rates))
    return SuffixCalibration(tuple(knots), tuple(values)), counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--offset", type=int, default=6000, help="skip the prompts the drafter data used")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--out", default=str(DEFAULT_CALIBRATION))
    ns = ap.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load_model(None, dtype=torch.bfloat16)
    rows = select_prompts(ns.prompts, ns.offset + ns.num_prompts, seed=0)[ns.offset: ns.offset + ns.num_prompts]
    prompts = [chat_prompt_ids(loaded.tokenizer, r["prompt"]) for r in rows]
    drafter = SuffixDrafter(num_speculative_tokens=ns.gamma)  # identity map: raw confidences
    args = EngineArgs(verify_policy=f"fixed:{ns.gamma}", max_num_seqs=len(prompts), speculative_method="suffix",
                      online_calibration=False)
    core = EngineCore(args, loaded=loaded, drafter=drafter)
    observations, stats = collect(core, prompts, ns.max_tokens, ns.gamma)
    table, counts = fit(observations)
    table.save(ns.out, fitted_on=f"{ns.num_prompts} held-out training prompts from offset {ns.offset}, greedy, "
               f"{ns.max_tokens} tokens, fixed:{ns.gamma}", observations_per_position=counts,
               tau=round(stats.accepted_length, 4))
    print(json.dumps({"out": ns.out, "observations_per_position": counts, "tau": stats.accepted_length}))


if __name__ == "__main__":
    main()
