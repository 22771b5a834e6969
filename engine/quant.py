"""Weight-only quantised linears on the CPU: GGUF Q4_0 / Q4_1 / Q8_0 blocks and load-time int8 / int4.

A quantised weight keeps two copies of *one canonical set of weight values*:

* the packed codes for torch's weight-only CPU kernels, used for small token counts (decode at batch
  1-4, where reading the weights dominates the step): ``torch.ops.aten._weight_int4pack_mm_for_cpu``
  (int4, group 32) or ``torch._weight_int8pack_mm`` (int8, per output channel);
* the dense matrix in the serving dtype, used for larger token counts (batched decode, verify blocks,
  prefill), where the bf16 GEMM (oneDNN) beats the int4 kernel (measured: benchmarks/bench_step.py).

**The canonical values** are what the int4 kernel computes with. The kernel (ATen
``native/cpu/int4mm_kernel.cpp``; checked bit for bit in tests/engine/test_quant.py) converts each packed code
``q`` in 0..15 and its group's ``scales_and_zeros[k // 32, n] = (scale, zero)`` (stored in the activation
dtype) to fp32 and forms ``w = (q - 8) * scale + zero`` in fp32 (one fused multiply-add), then
accumulates ``x @ w`` in fp32 and rounds the output to the activation dtype. So:

* GGUF Q4_1 (``w = d * q + m``, d and m fp16 per 32-block) maps onto ``scale = d``,
  ``zero = m + 8 d``; Q4_0 (``w = d * (q - 8)``) onto ``scale = d, zero = 0``; scale and zero are
  rounded to the serving dtype first (bf16 drops 3 mantissa bits of d: that rounding is part of the
  canonical model);
* Q8_0 (``w = d * q``, q int8) is expressed *exactly* as the sum of two int4 planes with
  ``q + 128 = 16 h + l``: ``w = (h - 8) * 16 d + ((l - 8) * d + 8 d)``; with d rounded to the serving
  dtype both fp32 products are exact, so the canonical value is ``d * q`` exactly. Here Q8_0 is the tied
  token embedding / LM head (49152 x 576, the largest matmul): with the weight-stationary kernel built
  it runs both planes in one pass (planes summed per weight in fp32, one fma per weight and row) up to 8
  rows (bench_results/int4_cpu.json); otherwise at M <= 4 as two int4 GEMVs, their bf16 outputs summed
  (2.5-3x faster than the bf16 GEMM, bench_results/step_quant.json); above that the dense bf16 GEMM. (``_weight_int8pack_mm``'s per-channel scales cannot express the
  per-32 block scales; the fp32 int4 kernel has no vectorised path, ~30x slower than bf16.)

In float32 the dense copy holds exactly the canonical values, so the GEMV and GEMM paths differ only by
fp32 summation order, as the GEMV / GEMM paths of a dense model do. In bfloat16 the dense copy holds the
canonical values rounded to bf16 (relative error <= 2^-9 per weight): the paths then differ by that
rounding, which the bf16 near-tie rule absorbs (tests/engine/test_quant.py checks batch invariance under it;
measured: 9 of 16 greedy continuations batched equal their solo text token for token, the rest part at
near-ties, against 16 of 16 for the dense bf16 model: docs/benchmarks.md). ``gemv_max_tokens = 0`` keeps
the blocks but runs every call dense (today's numerics on the canonical weights).

The kernels pay only with bf16 activations (the fp32 int4 path is scalar), so ``auto`` keeps GGUF blocks
only for a bf16 model on the CPU; explicit int8 / int4 work in fp32 too (tests use that: identical weights).

**The weight-stationary kernel** (kernels/int4_cpu.py, built by scripts/setup.sh): where its extension is
built, the int4 weights :func:`kernel_mode` selects (default: the two-plane Q8_0 LM head; with
``SPARKSERVE_INT4_KERNEL=all`` every one) are repacked for it instead of torch's kernel, and it serves
calls of up to 8 rows (16 with ``all``; or ``max_tokens`` if larger; ``max_tokens = 0`` still means always
dense). It computes with the same canonical values (all planes of a weight summed per weight in fp32, then one fp32
fma accumulator per output in increasing k), so a row's bits do not depend on how many rows share the call:
decode, batched decode and verify blocks of up to 16 rows give each row the same bits. Unbuilt, or with
``SPARKSERVE_INT4_KERNEL=0``, torch's kernel serves up to ``max_tokens`` rows as before.

Memory: both copies together are ~1.25x the bf16 model (SmolLM2-135M: +60 MB of codes on 270 MB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparkserve.engine import batch_invariant
from sparkserve.kernels import int4_cpu

GROUP = 32  # int4 group size = GGUF block size
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
DEFAULT_GEMV_MAX_TOKENS = 4  # int4 / int8 GEMV for <= this many rows (crossover measured: bench_step.py)
KERNEL_MAX_TOKENS = 16  # rows the weight-stationary kernel serves with SPARKSERVE_INT4_KERNEL=all
KERNEL_MAX_TOKENS_AUTO = 8  # ... by default (two-plane weights; dense bf16 is as fast from 8 rows: bench_int4.py)
KERNEL_MODES = ("auto", "all", "0")  # SPARKSERVE_INT4_KERNEL: which int4 weights use the weight-stationary kernel


def kernel_mode() -> str:
    """``SPARKSERVE_INT4_KERNEL``: "auto" (default: weights of two or more int4 planes, i.e. the Q8_0 LM head,
    where one fp32 fma per weight and row replaces torch's two GEMVs), "all" (every int4 weight, up to
    16 rows: each row's bits independent of the batch; the faster choice on AVX2-only CPUs) or "0" (off)."""
    mode = os.environ.get("SPARKSERVE_INT4_KERNEL", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"SPARKSERVE_INT4_KERNEL must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class BlockQuant:
    """A weight in GGUF-style group-32 blocks, as one or more int4 planes summed.

    Attributes:
        codes: per plane, uint8 [N, K] codes in 0..15.
        scales: per plane, float32 [N, K / 32] group scales.
        zeros: per plane, float32 [N, K / 32] group zeros (kernel convention ``(q - 8) * scale + zero``).
    """

    codes: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    zeros: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return tuple(self.codes[0].shape)  # type: ignore[return-value]

    def rows(self, start: int, stop: int) -> BlockQuant:
        """Rows ``start:stop`` of every plane."""
        return BlockQuant(tuple(c[start:stop] for c in self.codes), tuple(s[start:stop] for s in self.scales),
                          tuple(z[start:stop] for z in self.zeros))

    def permute_rows(self, index: torch.Tensor) -> BlockQuant:
        """Rows reordered by ``index`` [N] (llama.cpp's Q/K permutation undone)."""
        return BlockQuant(tuple(c[index] for c in self.codes), tuple(s[index] for s in self.scales),
                          tuple(z[index] for z in self.zeros))

    def canonical(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight values the int4 kernel computes with, float32 [N, K] (scale / zero rounded to
        ``dtype``; each plane's fma rounded to fp32, planes summed)."""
        # With bf16 / fp16 scales, (q - 8) * scale (4 x <= 11 significant bits) is exact in fp32, so fp32
        # multiply-then-add rounds once, like the fma; fp32 scales need the exact fma emulation.
        short = dtype in (torch.bfloat16, torch.float16)
        total = None
        for codes, scales, zeros in zip(self.codes, self.scales, self.zeros, strict=True):
            s = scales.to(dtype).float().repeat_interleave(GROUP, dim=1)
            z = zeros.to(dtype).float().repeat_interleave(GROUP, dim=1)
            q = codes.float() - 8.0
            plane = q * s + z if short else int4_cpu.fma32(q, s, z)  # one rounding to fp32 (= the kernel's fma)
            total = plane if total is None else total + plane
        assert total is not None
        return total

    def pack(self, dtype: torch.dtype, max_tokens: int) -> Int4Weight:
        """The weight for the int4 kernels with activations in ``dtype``: repacked for the weight-stationary
        kernel where its extension is loaded, else packed int4 planes for ``_weight_int4pack_mm_for_cpu``."""
        mode = kernel_mode()
        if mode != "0" and (mode == "all" or len(self.codes) > 1) and int4_cpu.load():
            cap = KERNEL_MAX_TOKENS if mode == "all" else KERNEL_MAX_TOKENS_AUTO
            return Int4Weight((), dtype, max_tokens, int4_cpu.repack_int4(self.codes, self.scales, self.zeros, dtype),
                              kernel_max_tokens=cap)
        sdtype = dtype
        planes = []
        for codes, scales, zeros in zip(self.codes, self.scales, self.zeros, strict=True):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            sz = torch.stack((scales.t(), zeros.t()), dim=-1).to(sdtype).contiguous()  # [K/32, N, 2]
            planes.append((packed, sz))
        return Int4Weight(tuple(planes), sdtype, max_tokens)


class Int4Weight:
    """One int4 linear weight [N, K], either repacked for the weight-stationary kernel (``kernel``) or as
    packed planes for torch's kernel; :meth:`__call__` is ``x @ w.T`` on them."""

    def __init__(self, planes: tuple[tuple[torch.Tensor, torch.Tensor], ...], dtype: torch.dtype,
                 max_tokens: int, kernel: int4_cpu.PackedInt4 | None = None, kernel_max_tokens: int = 0) -> None:
        self.planes = planes
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.kernel = kernel
        self.kernel_max_tokens = kernel_max_tokens

    def handles(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows runs here (else the dense GEMM): up to ``max_tokens`` rows,
        or up to ``kernel_max_tokens`` with the weight-stationary kernel; ``max_tokens = 0``: never."""
        cap = max(self.max_tokens, self.kernel_max_tokens) if self.kernel is not None and self.max_tokens else self.max_tokens
        return rows <= cap

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N] in the weight's activation dtype."""
        a = x.to(self.dtype)
        if self.kernel is not None:
            return int4_cpu.int4_mm(a, self.kernel)
        out = None
        for packed, sz in self.planes:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, GROUP, sz)
            out = part if out is None else out + part
        assert out is not None
        return out

    def nbytes(self) -> int:
        """Bytes of the packed codes and the scales / zeros."""
        if self.kernel is not None:
            return self.kernel.nbytes()
        return sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in self.planes)


class Int8Weight:
    """Per-output-channel symmetric int8 weight for ``torch._weight_int8pack_mm``: ``w = q * scale``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, max_tokens: int) -> None:
        self.codes = codes.contiguous()  # int8 [N, K]
        self.scales = scales  # [N], activation dtype
        self.max_tokens = max_tokens

    def handles(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows runs here (else the dense GEMM)."""
        return rows <= self.max_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]."""
        return torch._weight_int8pack_mm(x, self.codes, self.scales.to(x.dtype))

    def nbytes(self) -> int:
        """Bytes of the int8 codes and the scales."""
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


QuantWeight = Int4Weight | Int8Weight


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 quant: QuantWeight | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through the quantised kernel when ``quant`` is set and handles x's
    row count (both compute with the same canonical weight values). x: [M, K]. In batch-invariant mode
    (engine/batch_invariant.py) every row count runs the one dense path on a fixed row tile."""
    if batch_invariant.is_enabled():
        return batch_invariant.invariant_linear(x, weight, bias)
    if quant is None or not quant.handles(x.shape[0]) or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    out = quant(x)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if bias is None else out + bias


# --------------------------------------------------------------------------- GGUF blocks
def gguf_block_quant(raw: np.ndarray, qtype_name: str, shape: tuple[int, int]) -> BlockQuant | None:
    """GGUF Q4_0 / Q4_1 / Q8_0 raw bytes [N, K / 32 * block_bytes] -> BlockQuant; None for other types.

    Layouts (ggml ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``): fp16 d [, fp16 m], then 16 bytes
    whose low nibbles are elements 0..15 and high nibbles 16..31 (Q4), or 32 int8 (Q8_0).
    """
    n, k = shape
    nb = k // GROUP
    if qtype_name == "Q4_1":
        blocks = np.ascontiguousarray(raw).reshape(n, nb, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:20]
        codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1).reshape(n, k)
        zero = m + 8.0 * d  # (q - 8) d + (m + 8 d) = d q + m
        return BlockQuant((torch.from_numpy(codes),), (torch.from_numpy(d),), (torch.from_numpy(zero),))
    if qtype_name == "Q4_0":
        blocks = np.ascontiguousarray(raw).reshape(n, nb, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 2:18]
        codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1).reshape(n, k)
        return BlockQuant((torch.from_numpy(codes),), (torch.from_numpy(d),), (torch.zeros(n, nb),))
    if qtype_name == "Q8_0":
        blocks = np.ascontiguousarray(raw).reshape(n, nb, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16).reshape(n, k) + 128  # 0..255
        hi, lo = (q >> 4).astype(np.uint8), (q & 0x0F).astype(np.uint8)
        d_t = torch.from_numpy(d)
        return BlockQuant((torch.from_numpy(hi), torch.from_numpy(lo)), (16.0 * d_t, d_t),
                          (torch.zeros_like(d_t), 8.0 * d_t))
    return None


# --------------------------------------------------------------------------- load-time quantisation
def quantize_int4(weight: torch.Tensor, dtype: torch.dtype) -> BlockQuant:
    """Asymmetric group-32 int4 of a dense [N, K] weight (K % 32 == 0): per group ``scale = (max - min)
    / 15`` and ``zero = min + 8 scale`` rounded to ``dtype``, codes ``round((w - zero) / scale) + 8``."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int4 quantisation needs in-features divisible by {GROUP}, got {k}")
    w = weight.float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(dtype).float()
    zero = (lo + 8 * scale).to(dtype).float()
    codes = (torch.round((w - zero[..., None]) / scale[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    return BlockQuant((codes.reshape(n, k),), (scale,), (zero,))


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype, max_tokens: int) -> tuple[Int8Weight, torch.Tensor]:
    """Symmetric per-output-channel int8 of a dense [N, K] weight. Returns the kernel weight and the
    canonical dequantised values ``q * scale`` (float32 [N, K], scale rounded to ``dtype``)."""
    w = weight.float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8).to(dtype)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scale, max_tokens), codes.float() * scale.float()[:, None]
