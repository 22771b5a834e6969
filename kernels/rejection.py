"""Verification of every request's drafts in one launch (Triton); its torch reference is
``engine/spec_decode/verifier_kernels.rejection_sample_reference`` (the engine's rules on this flat input).

Same rules as ``engine/spec_decode/rejection.py`` (read its docstring for the terms: accepted,
recovered, bonus token; the flat ``[D]`` drafts and ``[N = D + R]`` target rows): one program per
request
- *agreement* rows (greedy, Gumbel-coupled): accept the leading drafts equal to the target's own
  choices ``target_choice``, emit the target's choice at the first disagreement (or the bonus row);
- *rejection* rows (unseeded sampled): accept draft j iff ``u_j * max(q_j(x_j), 1e-8) < p_j(x_j)``;
  after a rejection at a, draw the recovered token from ``max(p_a - q_a, 0)`` by CDF inversion at a
  keyed uniform (pass 1 sums the residual and p while reading them, pass 2 inverts at ``u * total``:
  no normalised copy), falling back to ``p_a`` when the residual mass is below 1e-8; with every draft
  accepted, draw the bonus token from ``p_{l_r}``. Deterministic drafts have one-hot q.
The uniforms are generated inside the kernel from (key, position, draw) with the fmix32 hash of
``kernels/keyed_random.py`` (``kernels/keyed_hash.py``, bit-identical), so for the same keys
the kernel emits exactly the tokens of the torch reference (up to fp32 summation order in the CDF,
which can only matter when ``u * total`` lands within rounding of a CDF step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparkserve.kernels.common import check_kernel_device, check_tensor, interpreting, next_power_of_2
from sparkserve.kernels.keyed_hash import DRAW_ACCEPT, DRAW_RECOVER, DRAW_TOKEN, NUM_DRAW_KINDS
from sparkserve.kernels.keyed_hash import keyed_uniform as keyed_uniform_jit
from sparkserve.kernels.verify_contract import Q_FLOOR, RESIDUAL_MIN_MASS, VerifyResult

DEFAULT_BLOCK_V = 1024
Q_FLOOR_C: tl.constexpr = tl.constexpr(Q_FLOOR)  # the torch rule's constants, readable in a kernel
RESIDUAL_MIN_MASS_C: tl.constexpr = tl.constexpr(RESIDUAL_MIN_MASS)
INTERPRETER_BLOCK_R = 4096


@dataclass(frozen=True)
class FlatVerifyInput:
    """R requests' drafts and target rows, flat (no padding).

    Attributes:
        draft_token_ids: ``[D]`` int64 drafts, request after request.
        cu_num_draft_tokens: ``[R + 1]`` int32 first draft of each request (and D at the end);
            request r's target rows are ``cu[r] + r .. cu[r + 1] + r``.
        max_num_draft_tokens: host max l_r (the output width is ``1 + max``).
        agreement: ``[R]`` bool, True = verify by agreement with ``target_choice``.
        target_choice: ``[N]`` int64 the target's own token at every row (read for agreement rows).
        target_probs: ``[N, V]`` fp32 target distributions p (read for rejection rows only; other
            rows may hold anything).
        draft_probs: ``[D, V']`` fp32 q rows (V' <= V), or None when every draft is one-hot (then
            ``draft_one_hot`` must be all True, as ``DraftProbs`` has it).
        draft_one_hot: ``[D]`` bool, True where the draft was deterministic (q one-hot at the draft).
        keys / first_positions / attempts: ``[R]`` int64 each request's random key, the sequence
            position of the token chosen at its first row, and its verify attempt (``draw_index``).
    """

    draft_token_ids: Tensor
    cu_num_draft_tokens: Tensor
    max_num_draft_tokens: int
    agreement: Tensor
    target_choice: Tensor | None
    target_probs: Tensor | None
    draft_probs: Tensor | None
    draft_one_hot: Tensor
    keys: Tensor
    first_positions: Tensor
    attempts: Tensor

    @property
    def num_requests(self) -> int:
        return int(self.keys.numel())


@triton.jit
def _num_accepted(draft_ids_ptr, choice_ptr, p_ptr, stride_p, q_ptr, stride_q, vocab_q, one_hot_ptr, key, pos0,
                  draw_base, d0, first_row, n, agree, live_r, max_n, HAS_Q: tl.constexpr):
    """``[BLOCK_R]`` leading run of accepted drafts: agreement rows ``x == y``, rejection rows
    ``u * max(q(x), 1e-8) < p(x)``."""
    a = tl.zeros_like(n)
    still = live_r.to(tl.int32)
    for j in range(0, max_n):
        live = live_r & (j < n)
        sampled = live & ~agree
        x = tl.load(draft_ids_ptr + d0 + j, mask=live, other=0)
        y = tl.load(choice_ptr + first_row + j, mask=live & agree, other=0)
        p_x = tl.load(p_ptr + (first_row + j).to(tl.int64) * stride_p + x, mask=sampled, other=0.0)
        q_x = p_x * 0.0 + 1.0
        if HAS_Q:
            hot = tl.load(one_hot_ptr + d0 + j, mask=live, other=1) != 0
            dense = tl.load(q_ptr + (d0 + j).to(tl.int64) * stride_q + x, mask=sampled & ~hot & (x < vocab_q),
                            other=0.0)
            q_x = tl.where(hot, q_x, dense)
        u = keyed_uniform_jit(key, pos0 + j, draw_base + DRAW_ACCEPT)
        ok = tl.where(agree, x == y, u * tl.maximum(q_x, Q_FLOOR_C) < p_x)
        still = still * (ok & live).to(tl.int32)
        a += still
    return a


@triton.jit
def _weights(p_ptr, q_ptr, p_base, q_base, vocab, vocab_q, x, hot, sampled, rejected, idx, HAS_Q: tl.constexpr):
    """p and the residual ``max(p - q, 0)`` ``[BLOCK_R, K]`` at token ids ``idx`` (0 outside the vocabulary
    and on rows not drawn here)."""
    ok = idx < vocab
    p = tl.load(p_ptr + p_base[:, None] + idx, mask=sampled[:, None] & ok, other=0.0)
    q = tl.where(idx == x[:, None], 1.0, 0.0)
    if HAS_Q:
        dense = tl.load(q_ptr + q_base[:, None] + idx, mask=(rejected & ~hot)[:, None] & (idx < vocab_q), other=0.0)
        q = tl.where(hot[:, None], q, dense)
    return p, tl.where(ok, tl.maximum(p - q, 0.0), 0.0)


@triton.jit
def _final_token(p_ptr, stride_p, q_ptr, stride_q, one_hot_ptr, draft_ids_ptr, row, d_rej, sampled, rejected, key,
                 pos0, draw_base, vocab, vocab_q, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """``[BLOCK_R]`` recovered token (rejected: the residual, or p when its mass < 1e-8) or bonus token (p),
    by CDF inversion: pass 1 sums both weights (and their argmaxes), pass 2 finds u * total."""
    x = tl.load(draft_ids_ptr + d_rej, mask=rejected, other=-1)  # masked rows: no token matches
    hot = tl.load(one_hot_ptr + d_rej, mask=rejected, other=1) != 0
    p_base, q_base = row.to(tl.int64) * stride_p, d_rej.to(tl.int64) * stride_q
    tot_p = tl.zeros(row.shape, tl.float32)
    tot_r = tl.zeros(row.shape, tl.float32)
    best_p = tl.full(row.shape, -1.0, tl.float32)
    best_r = tl.full(row.shape, -1.0, tl.float32)
    arg_p = tl.zeros(row.shape, tl.int32)
    arg_r = tl.zeros(row.shape, tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        idx = (v0 + tl.arange(0, BLOCK_V))[None, :]
        p, res = _weights(p_ptr, q_ptr, p_base, q_base, vocab, vocab_q, x, hot, sampled, rejected, idx, HAS_Q)
        tot_p += tl.sum(p, 1)
        tot_r += tl.sum(res, 1)
        bp, br = tl.max(p, 1), tl.max(res, 1)
        arg_p = tl.where(bp > best_p, v0 + tl.argmax(p, 1), arg_p)
        arg_r = tl.where(br > best_r, v0 + tl.argmax(res, 1), arg_r)
        best_p, best_r = tl.maximum(best_p, bp), tl.maximum(best_r, br)
    use_res = rejected & (tot_r > RESIDUAL_MIN_MASS_C)
    u = keyed_uniform_jit(key, pos0, draw_base + tl.where(rejected, DRAW_RECOVER, DRAW_TOKEN))
    target = u * tl.where(use_res, tot_r, tot_p)
    carry = tl.zeros(row.shape, tl.float32)
    first = tl.zeros(row.shape, tl.int32) + vocab
    for v0 in range(0, vocab, BLOCK_V):
        idx = (v0 + tl.arange(0, BLOCK_V))[None, :]
        p, res = _weights(p_ptr, q_ptr, p_base, q_base, vocab, vocab_q, x, hot, sampled, rejected, idx, HAS_Q)
        w = tl.where(use_res[:, None], res, p)
        cdf = carry[:, None] + tl.cumsum(w, 1)
        first = tl.minimum(first, tl.min(tl.where((cdf > target[:, None]) & (idx < vocab), idx, vocab), 1))
        carry += tl.sum(w, 1)
    chosen = tl.minimum(first, vocab - 1)
    p_c, res_c = _weights(p_ptr, q_ptr, p_base, q_base, vocab, vocab_q, x, hot, sampled, rejected, chosen[:, None],
                          HAS_Q)
    zero = tl.sum(tl.where(use_res[:, None], res_c, p_c), 1) <= 0  # u * total rounded onto the total: argmax
    return tl.where(zero, tl.where(use_res, arg_r, arg_p), chosen).to(tl.int64)


@triton.jit
def _rejection_kernel(
    tokens_ptr, num_accepted_ptr, draft_ids_ptr, cu_ptr, agree_ptr, choice_ptr, p_ptr, q_ptr, one_hot_ptr,
    keys_ptr, first_pos_ptr, attempts_ptr, stride_t, stride_p, stride_q, vocab, vocab_q, width, num_requests, max_n,
    HAS_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """BLOCK_R requests: accepted counts, then the final token (target choice / recovered / bonus)."""
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live_r = rs < num_requests
    d0 = tl.load(cu_ptr + rs, mask=live_r, other=0)
    n = tl.load(cu_ptr + rs + 1, mask=live_r, other=0) - d0
    first_row = d0 + rs
    agree = tl.load(agree_ptr + rs, mask=live_r, other=0) != 0
    key = tl.load(keys_ptr + rs, mask=live_r, other=0)
    pos0 = tl.load(first_pos_ptr + rs, mask=live_r, other=0)
    draw_base = tl.load(attempts_ptr + rs, mask=live_r, other=0) * NUM_DRAW_KINDS
    a = _num_accepted(draft_ids_ptr, choice_ptr, p_ptr, stride_p, q_ptr, stride_q, vocab_q, one_hot_ptr, key, pos0,
                      draw_base, d0, first_row, n, agree, live_r, max_n, HAS_Q)
    chosen = tl.load(choice_ptr + first_row + a, mask=live_r & agree, other=0)
    sampled = live_r & ~agree
    drawn = _final_token(p_ptr, stride_p, q_ptr, stride_q, one_hot_ptr, draft_ids_ptr, first_row + a, d0 + a,
                         sampled, sampled & (a < n), key, pos0, draw_base, vocab, vocab_q, HAS_Q, BLOCK_V)
    final = tl.where(agree, chosen, drawn)
    cols = tl.arange(0, BLOCK_W)[None, :]
    out = tl.load(draft_ids_ptr + d0[:, None] + cols, mask=live_r[:, None] & (cols < a[:, None]), other=0)
    out = tl.where(cols == a[:, None], final[:, None], out)
    tl.store(tokens_ptr + rs[:, None].to(tl.int64) * stride_t + cols, out, mask=live_r[:, None] & (cols < width))
    tl.store(num_accepted_ptr + rs, a.to(tl.int64), mask=live_r)


def rejection_sample(inp: FlatVerifyInput, block_v: int = DEFAULT_BLOCK_V, block_r: int | None = None) -> VerifyResult:
    """Verify R requests in one launch (module docstring); ``block_r`` requests per program (None: 1
    on CUDA, where each request's vocabulary passes are the work; ``INTERPRETER_BLOCK_R`` in the interpreter, whose cost is
    per operation).

    ``target_choice`` / ``target_probs`` may be None only when no row needs them (checked with a host
    sync; pass both to keep the call sync-free, e.g. under CUDA graphs).

    Returns:
        ``VerifyResult``: ``token_ids [R, 1 + max l_r]`` int64 (accepted drafts, the final token, 0s)
        and ``num_accepted [R]`` int64, on the inputs' device.
    Raises:
        ValueError: bad dtypes / shapes / contiguity, or a missing tensor a row kind needs.
    """
    args = _kernel_args(inp)
    device = inp.keys.device
    num_requests, width = inp.num_requests, 1 + inp.max_num_draft_tokens
    tokens = torch.empty(num_requests, width, dtype=torch.int64, device=device)
    accepted = torch.empty(num_requests, dtype=torch.int64, device=device)
    if num_requests == 0:
        return VerifyResult(tokens, accepted)
    ids, choice, probs, q, one_hot = args
    vocab, vocab_q = probs.shape[1], q.shape[1]
    block_r = block_r or (INTERPRETER_BLOCK_R if interpreting() else 1)
    _rejection_kernel[(triton.cdiv(num_requests, block_r),)](
        tokens, accepted, ids, inp.cu_num_draft_tokens, inp.agreement.to(torch.int32), choice, probs, q, one_hot,
        inp.keys, inp.first_positions, inp.attempts, tokens.stride(0), probs.stride(0), q.stride(0), vocab,
        vocab_q, width, num_requests, inp.max_num_draft_tokens,
        HAS_Q=inp.draft_probs is not None, BLOCK_R=block_r, BLOCK_V=min(block_v, next_power_of_2(vocab)),
        BLOCK_W=next_power_of_2(width),
    )
    return VerifyResult(tokens, accepted)


def _kernel_args(inp: FlatVerifyInput) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validate; returns (drafts, choices, p, q, one-hot flags) with 1-element placeholders for absent
    or empty ones (a kernel argument must point at memory; placeholders are never read)."""
    device = inp.keys.device
    for name in ("keys", "first_positions", "attempts"):
        check_tensor(name, getattr(inp, name), 1, (torch.int64,))
    check_tensor("cu_num_draft_tokens", inp.cu_num_draft_tokens, 1, (torch.int32,))
    check_tensor("agreement", inp.agreement, 1, (torch.bool,))
    check_kernel_device(inp.keys)
    if inp.cu_num_draft_tokens.numel() != inp.num_requests + 1 or inp.agreement.numel() != inp.num_requests:
        raise ValueError("cu_num_draft_tokens needs R + 1 entries and agreement R")
    if inp.target_choice is None and bool(inp.agreement.any()):
        raise ValueError("agreement rows need target_choice")
    if inp.target_probs is None and not bool(inp.agreement.all()):
        raise ValueError("rejection rows need target_probs")
    ids = _or_placeholder(inp.draft_token_ids, torch.int64, device)
    check_tensor("draft_token_ids", ids, 1, (torch.int64,))
    choice = _or_placeholder(inp.target_choice, torch.int64, device)
    check_tensor("target_choice", choice, 1, (torch.int64,))
    probs = inp.target_probs if inp.target_probs is not None else torch.zeros(1, 1, device=device)
    q = inp.draft_probs if inp.draft_probs is not None else probs
    for name, t in (("target_probs", probs), ("draft_probs", q)):
        check_tensor(name, t, 2, (torch.float32,), contiguous=False)
        if t.stride(1) != 1:
            raise ValueError(f"{name} rows must be contiguous")
    one_hot = _or_placeholder(inp.draft_one_hot, torch.bool, device)
    check_tensor("draft_one_hot", one_hot, 1, (torch.bool,))
    return ids, choice, probs, q, one_hot.to(torch.int32)


def _or_placeholder(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t``, or a 1-element zero tensor when it is None or empty."""
    return t if t is not None and t.numel() else torch.zeros(1, dtype=dtype, device=device)


__all__ = ["FlatVerifyInput", "rejection_sample"]
