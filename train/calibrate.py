"""``calibrate-drafter``: sequential temperature scaling of the confidence head (DSpark paper, Sequential
Temperature Scaling; DEEPSPEC_FORMAT.md section 5).

Labels come from running drafts against the target at T = 1 (the stochastic-acceptance prefix y_k,
train/spec_eval.py) on held-out prompts. For k = 0..B-1, left to right, T_k is a 1-D grid search that
minimises the ECE (20 bins) of the cumulative survival a_k = prod_{i<=k} sigmoid(logit_i / T_i), the
temperatures of positions < k already fixed. The fit at T = 1 is stored as ``confidence_temperatures`` in the
drafter's config.json; a second fit on greedy verification (T = 0, labels = exact prefix match) as
``confidence_temperatures_greedy``. The engine's confidence head applies the vector matching each request.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from sparkserve.train.metrics import cumulative_survival, ece

GRID = [round(float(t), 4) for t in torch.logspace(-1.0, 1.0, 81)]  # 0.1 .. 10


def fit_temperatures(conf_logits: Tensor, labels: Tensor, num_drafted: list[int],
                     grid: list[float] | None = None) -> list[float]:
    """Per-position temperatures. conf_logits / labels: [rounds, B]; num_drafted: n_eff per round."""
    grid = grid or GRID
    b = conf_logits.shape[1]
    drafted = torch.tensor(num_drafted)
    temps = [1.0] * b
    for k in range(b):
        sel = drafted > k
        if not bool(sel.any()):
            continue
        y = labels[sel, k].double()
        best = (float("inf"), 1.0)
        for t in grid:
            trial = temps[:k] + [t] + [1.0] * (b - k - 1)
            score = ece(cumulative_survival(conf_logits[sel], trial)[:, k], y)
            best = min(best, (score, t))
        temps[k] = best[1]
    return temps


def write_temperatures(drafter_dir: str | Path, temperatures: list[float],
                       greedy_temperatures: list[float] | None = None) -> None:
    """Store ``confidence_temperatures`` (and ``confidence_temperatures_greedy`` when given) in config.json,
    validated through DSparkConfig. Raises ValueError on a wrong length or a non-positive value."""
    from sparkserve.engine.spec_decode.dspark_loader import DSparkConfig

    path = Path(drafter_dir) / "config.json"
    raw = json.loads(path.read_text())
    greedy = tuple(greedy_temperatures) if greedy_temperatures is not None else None
    dataclasses.replace(DSparkConfig.from_dict(raw), confidence_temperatures=tuple(temperatures),
                        confidence_temperatures_greedy=greedy)
    raw["confidence_temperatures"] = list(temperatures)
    if greedy is not None:
        raw["confidence_temperatures_greedy"] = list(greedy)
    else:
        raw.pop("confidence_temperatures_greedy", None)
    path.write_text(json.dumps(raw, indent=2) + "\n")
