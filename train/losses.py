"""DSpark training loss (DEEPSPEC_FORMAT.md section 4, the released code; paper Eq. 9-12).

Per block slot k (0-based) of an anchor s, with eval mask e_k (contiguous prefix of slots whose label
exists and is a response token) and weight ``w_k = e_k * exp(-k / 4)``:
- CE_k = cross-entropy of the step logits Z_k = lm_head(h_k) + W2 W1[prev_k] against y_k = token s+1+k;
- L1_k = ||p_d,k - p_t,k||_1 with p_d,k = softmax(Z_k), p_t,k = target softmax at position s+k (T = 1);
- CONF_k = BCEwithLogits(conf_logit_k, c*_k), c*_k = clamp(1 - 0.5 * L1_k, 0, 1) detached.
Each term is ``sum_k w_k * term_k / sum_k w_k``; total = ce * CE + tv * TV + conf * CONF
(DSpark 0.1 / 0.9 / 1.0; DFlash 1.0 / 0 / 0).

Cheap L1: p_t is kept as its top-K tokens + rest mass r_t (train/target.py), and
``L1 ~= sum_{i in topK} |p_d(i) - p_t(i)| + |r_d - r_t|`` with r_d = 1 - sum_{topK} p_d. This is exact on
the support and, by the triangle inequality, a lower bound of the true L1 outside it; it is exact
whenever p_d - p_t has one sign over the tokens outside the top-K (e.g. the target puts no mass there).
So the 49k-wide softmax is needed only for the draft's log-normaliser (shared with CE), never for p_t.
Note ``1 - 0.5 * L1 = sum_i min(p_d, p_t)``: the probability that a draft sampled from p_d is accepted
at T = 1, logged per slot as ``accept_est``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparkserve.engine.spec_decode.dspark import DSparkDrafter

DECAY_GAMMA = 4.0


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of the three terms."""

    ce: float
    tv: float
    conf: float

    @classmethod
    def for_kind(cls, kind: str) -> LossWeights:
        """DSpark 0.1/0.9/1.0 and DFlash 1.0/0/0 (section 4); the AR baseline gets DSpark's distillation
        objective without the confidence term (same training signal as the drafter it is compared to)."""
        return {"dspark": cls(0.1, 0.9, 1.0), "dflash": cls(1.0, 0.0, 0.0), "ar": cls(0.1, 0.9, 0.0)}[kind]


@dataclass
class LossOutput:
    """total: scalar with grad; terms: detached floats; accept_est / top1: per-slot means (None if no row)."""

    total: Tensor
    terms: dict[str, float]
    accept_est: list[float | None]
    top1: list[float | None]


def slot_weights(eval_mask: Tensor) -> Tensor:
    """w_k = eval_mask_k * exp(-k / 4). eval_mask: [..., B] bool -> [..., B] fp32."""
    b = eval_mask.shape[-1]
    decay = torch.exp(-torch.arange(b, device=eval_mask.device, dtype=torch.float32) / DECAY_GAMMA)
    return eval_mask.float() * decay


def dspark_loss(drafter: DSparkDrafter, h: Tensor, prev: Tensor, labels: Tensor, eval_mask: Tensor,
                tgt_ids: Tensor, tgt_probs: Tensor, tgt_rest: Tensor, weights: LossWeights) -> LossOutput:
    """Loss of every block slot.

    Args:
        h: [N, A, B, d] drafter hidden states; prev: [N, A, B] teacher-forced Markov inputs
            [token_s, y_0 .. y_{B-2}]; labels: [N, A, B] y_k; eval_mask: [N, A, B] bool (prefix).
        tgt_ids / tgt_probs: [N, A, B, K] target top-K at position s+k; tgt_rest: [N, A, B].
    """
    b = h.shape[2]
    w_all = slot_weights(eval_mask)
    rows = w_all.flatten() > 0  # only weighted rows reach the LM head
    slot = torch.arange(b, device=h.device).expand_as(labels).flatten()[rows]
    hr, prev_r, y = h.flatten(0, 2)[rows], prev.flatten()[rows], labels.flatten()[rows]
    w = w_all.flatten()[rows]
    z = F.linear(hr, drafter.lm_head_weight.to(hr.dtype))  # [R, V] U_k
    if drafter.markov_head is not None:
        z = z + drafter.markov_head(prev_r)
    z = z.float()
    log_norm = z.logsumexp(-1)  # [R]
    ce = log_norm - z.gather(1, y[:, None]).squeeze(1)
    k_ids, k_probs = tgt_ids.flatten(0, 2)[rows], tgt_probs.flatten(0, 2)[rows]
    pd_top = (z.gather(1, k_ids) - log_norm[:, None]).exp()  # [R, K]
    rest_d = (1.0 - pd_top.sum(-1)).clamp_min(0.0)
    l1 = (pd_top - k_probs).abs().sum(-1) + (rest_d - tgt_rest.flatten()[rows]).abs()  # [R]
    total_w = w.sum().clamp_min(1e-8)
    terms = {"ce": (w * ce).sum() / total_w, "tv": (w * l1).sum() / total_w}
    total = weights.ce * terms["ce"] + weights.tv * terms["tv"]
    if drafter.confidence_head is not None:
        feats = hr
        if drafter.config.confidence_head_with_markov and drafter.markov_head is not None:
            feats = torch.cat((hr, drafter.markov_head.markov_w1(prev_r).to(hr.dtype)), -1)
        logit = drafter.confidence_head.proj(feats).squeeze(-1).float()
        target_c = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
        bce = F.binary_cross_entropy_with_logits(logit, target_c, reduction="none")
        terms["conf"] = (w * bce).sum() / total_w
        total = total + weights.conf * terms["conf"]
    with torch.no_grad():
        acc = 1.0 - 0.5 * l1
        hit = (z.argmax(-1) == y).float()
        accept_est, top1 = [], []
        for k in range(b):
            sel = slot == k
            n = int(sel.sum())
            accept_est.append(float(acc[sel].mean()) if n else None)
            top1.append(float(hit[sel].mean()) if n else None)
    out_terms = {k: float(v.detach()) for k, v in terms.items()}
    out_terms["loss"] = float(total.detach())
    out_terms["rows"] = float(rows.sum())
    if not math.isfinite(out_terms["loss"]):
        raise FloatingPointError(f"non-finite loss: {out_terms}")
    return LossOutput(total, out_terms, accept_est, top1)
