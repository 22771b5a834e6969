"""Evaluation metrics (DEEPSPEC_FORMAT.md section 3 definitions).

- accept_rate@k (prefix survival) = #rounds with a > k / #rounds with n_eff > k; conditional acceptance
  = survival@k / survival@(k-1) (paper Fig. 2).
- Confidence calibration of the cumulative survival P_k = prod_{i<=k} c_i (fp64, clamped to [1e-8, 1-1e-8])
  against y_k = 1 iff drafts 0..k all passed, over rounds with n_eff > k: ECE (20 equal-width bins,
  sum_b n_b |mean P_b - mean y_b| / N), AUROC from 1000-bin histograms, Brier = mean (P - y)^2; the
  summary is the count-weighted mean over positions (AUC over positions where it is finite).
- Repetition share: fraction of output tokens that complete an n-gram (n = 8) already seen earlier in the
  same output: text the target copies from itself, which inflates tau.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def survival_by_position(num_accepted: list[int], num_drafted: list[int], block_size: int) -> tuple[list, list]:
    """(survival@k, conditional@k) for k = 0..B-1 (None where no round drafted position k)."""
    surv = []
    for k in range(block_size):
        drafted = sum(1 for n in num_drafted if n > k)
        hit = sum(1 for a, n in zip(num_accepted, num_drafted, strict=True) if n > k and a > k)
        surv.append(hit / drafted if drafted else None)
    cond = [surv[0]] + [(s / p if s is not None and p else None) for p, s in zip(surv, surv[1:], strict=False)]
    return surv, cond


def cumulative_survival(conf_logits: Tensor, temperatures: list[float] | None = None) -> Tensor:
    """P_k = prod_{i<=k} sigmoid(logit_i / T_i): [rounds, B] fp64, clamped to [1e-8, 1 - 1e-8]."""
    temps = torch.tensor(temperatures or [1.0] * conf_logits.shape[1], dtype=torch.float64)
    return torch.sigmoid(conf_logits.double() / temps).cumprod(-1).clamp(1e-8, 1 - 1e-8)


def ece(pred: Tensor, label: Tensor, bins: int = 20) -> float:
    """Expected calibration error, equal-width bins (bin = floor(bins * P), clamped)."""
    if pred.numel() == 0:
        return float("nan")
    idx = (pred * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in idx.unique().tolist():
        sel = idx == b
        total += float(sel.sum()) * abs(float(pred[sel].mean()) - float(label[sel].double().mean()))
    return total / pred.numel()


def auroc(pred: Tensor, label: Tensor, bins: int = 1000) -> float:
    """AUROC from histograms: [sum_b pos_b * neg_below_b + 0.5 * sum_b pos_b * neg_b] / (P * N)."""
    idx = (pred * bins).long().clamp(0, bins - 1)
    pos = torch.bincount(idx[label.bool()], minlength=bins).double()
    neg = torch.bincount(idx[~label.bool()], minlength=bins).double()
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = torch.cumsum(neg, 0) - neg
    return float((pos * below).sum() + 0.5 * (pos * neg).sum()) / (n_pos * n_neg)


def calibration_report(conf_logits: Tensor, labels: Tensor, num_drafted: list[int],
                       temperatures: list[float] | None = None) -> dict:
    """Per-position ECE / AUC / Brier / pred_mean / target_mean and count-weighted summary."""
    pred = cumulative_survival(conf_logits, temperatures)
    drafted = torch.tensor(num_drafted)
    per_pos = []
    for k in range(pred.shape[1]):
        sel = drafted > k
        p, y = pred[sel, k], labels[sel, k].double()
        per_pos.append({"k": k, "count": int(sel.sum()), "ece": ece(p, y), "auc": auroc(p, y),
                        "brier": float(((p - y) ** 2).mean()) if p.numel() else float("nan"),
                        "pred_mean": float(p.mean()) if p.numel() else float("nan"),
                        "target_mean": float(y.mean()) if p.numel() else float("nan")})
    summary = {}
    for key in ("ece", "auc", "brier"):
        rows = [r for r in per_pos if r["count"] and math.isfinite(r[key])]
        weight = sum(r["count"] for r in rows)
        summary[key] = sum(r[key] * r["count"] for r in rows) / weight if weight else float("nan")
    return {"summary": summary, "per_position": per_pos}


def reliability_bins(conf_logits: Tensor, labels: Tensor, num_drafted: list[int],
                     temperatures: list[float] | None = None, bins: int = 20) -> list[tuple[float, float, int]]:
    """(mean predicted survival, observed survival, count) per bin, all positions pooled."""
    pred = cumulative_survival(conf_logits, temperatures)
    valid = torch.arange(pred.shape[1])[None, :] < torch.tensor(num_drafted)[:, None]
    p, y = pred[valid], labels[valid].double()
    idx = (p * bins).long().clamp(0, bins - 1)
    return [(float(p[idx == b].mean()), float(y[idx == b].mean()), int((idx == b).sum()))
            for b in range(bins) if (idx == b).any()]


def repetition_share(tokens: list[int], n: int = 8) -> float:
    """Fraction of tokens that end an n-gram seen earlier in ``tokens``."""
    if len(tokens) <= n:
        return 0.0
    seen, repeated = set(), 0
    for i in range(n - 1, len(tokens)):
        gram = tuple(tokens[i - n + 1:i + 1])
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(tokens)
