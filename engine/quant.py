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
  token embedding / LM head (49152 x 576, the largest matmul): where its routing names an int4 path it
  runs both planes in one pass of the weight-stationary kernel (planes summed per weight in fp32, one fma
  per weight and row; bench_results/int4_cpu_quiet.json), or, that kernel unbuilt, as two int4 GEMVs with
  their bf16 outputs summed (2.5-3x faster than the bf16 GEMM, bench_results/step_quant.json); above
  that the dense bf16 GEMM. (``_weight_int8pack_mm``'s per-channel scales cannot express the
  per-32 block scales; the fp32 int4 kernel has no vectorised path, ~30x slower than bf16.)

In float32 the dense copy holds exactly the canonical values, so the GEMV and GEMM paths differ only by
fp32 summation order, as the GEMV / GEMM paths of a dense model do. In bfloat16 the dense copy holds the
canonical values rounded to bf16 (relative error <= 2^-9 per weight): the paths then differ by that
rounding, which the bf16 near-tie rule absorbs (tests/engine/test_quant.py checks batch invariance under it;
measured: 9 of 16 greedy continuations batched equal their solo text token for token, the rest part at
near-ties, against 16 of 16 for the dense bf16 model: docs/benchmarks.md). A routing of no rows keeps
the blocks but runs every call dense (today's numerics on the canonical weights).

The kernels pay only with bf16 activations (the fp32 int4 path is scalar), so ``auto`` keeps GGUF blocks
only for a bf16 model on the CPU; explicit int8 / int4 work in fp32 too (tests use that: identical weights).

**Routing** (:class:`Routing`): which path serves a call is asked per call by :func:`quant_linear` of the
weight's routing, the CPU plan's per-row-bucket choice (engine/cpu_plan.py: ``CpuPlan.routing``; without a
plan a fixed row cap, ``--quant-gemv-max-tokens``, default 4). Paths: ``dense`` (the GEMM on the dense
copy), ``int4_gemv`` (torch's kernel), ``int4_ws`` (the weight-stationary kernel, kernels/int4_cpu.py,
built by scripts/setup.sh), ``int4_ws_q8`` (its int8-dot variant: activations rounded to int8 per group of 32,
so *not* the canonical product: opt-in only, ``SPARKSERVE_INT4_ACTIVATIONS=int8``, engine/cpu_plan.py),
``int8_gemv``. A weight keeps only the formats its routing uses; where the
weight-stationary extension is not built, ``int4_ws`` falls back to torch's kernel (:func:`int4_formats`,
also for ``SPARKSERVE_INT4_KERNEL``). The weight-stationary kernel computes with the same canonical values
(all planes of a weight summed per weight in fp32, then one fp32 fma accumulator per output in
increasing k), so a row's bits do not depend on how many rows share the call.

Memory: both copies together are ~1.25x the bf16 model (SmolLM2-135M: +60 MB of codes on 270 MB).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparkserve.engine import batch_invariant
from sparkserve.kernels import int4_cpu

GROUP = 32  # int4 group size = GGUF block size
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
DEFAULT_GEMV_MAX_TOKENS = 4  # int4 / int8 GEMV for <= this many rows (crossover measured: bench_step.py)
KERNEL_MODES = ("auto", "all", "0")  # SPARKSERVE_INT4_KERNEL: which int4 weights use the weight-stationary kernel
QUANT_PATHS = ("int4_gemv", "int4_ws", "int4_ws_q8", "int8_gemv")  # engine/cpu_plan.py's quantised path names


def kernel_mode() -> str:
    """``SPARKSERVE_INT4_KERNEL``: "auto" (default: the routing's int4 paths as given, except that weights of
    two or more int4 planes, i.e. the Q8_0 LM head, run the weight-stationary kernel where the routing
    says ``int4_gemv``: one fp32 fma per weight and row replaces torch's two GEMVs), "all" (every int4
    path on the weight-stationary kernel: each row's bits independent of the batch) or "0" (off)."""
    mode = os.environ.get("SPARKSERVE_INT4_KERNEL", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"SPARKSERVE_INT4_KERNEL must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Routing:
    """Which path serves a quantised linear call, per row count: the plan's answer (engine/cpu_plan.py),
    asked by :func:`quant_linear` on every call.

    Attributes:
        limits: increasing ``(max_rows, path)`` pairs; a call of M rows takes the path of the first pair
            with ``max_rows >= M``, beyond the last pair "dense". Paths: "dense" or one of ``QUANT_PATHS``.
    Raises:
        ValueError: limits not strictly increasing, a row count < 1, or an unknown path.
    """

    limits: tuple[tuple[int, str], ...]

    def __post_init__(self) -> None:
        rows = [m for m, _ in self.limits]
        if any(m < 1 for m in rows) or rows != sorted(set(rows)):
            raise ValueError(f"routing limits must be strictly increasing row counts >= 1, got {self.limits}")
        unknown = {p for _, p in self.limits} - {"dense", *QUANT_PATHS}
        if unknown:
            raise ValueError(f"unknown linear paths {sorted(unknown)} (known: dense, {', '.join(QUANT_PATHS)})")

    @classmethod
    def up_to(cls, max_rows: int, path: str = "int4_gemv") -> Routing:
        """``path`` for calls of at most ``max_rows`` rows, dense above (``max_rows = 0``: always dense)."""
        return cls(((max_rows, path),) if max_rows > 0 else ())

    def path_for(self, rows: int) -> str:
        """The path serving a call of ``rows`` rows."""
        for max_rows, path in self.limits:
            if rows <= max_rows:
                return path
        return "dense"

    @property
    def paths(self) -> frozenset[str]:
        """The quantised paths it uses (the weight formats a weight routed by it must keep)."""
        return frozenset(p for _, p in self.limits if p != "dense")

    def summary(self) -> str:
        """A short stable string for logs and cache keys, e.g. ``int4_ws<=8`` (empty: always dense)."""
        return ",".join(f"{p}<={m}" for m, p in self.limits)

    def renamed(self, rename: dict[str, str]) -> Routing:
        """The same row limits with paths renamed (a path missing from ``rename`` is kept)."""
        return Routing(tuple((m, rename.get(p, p)) for m, p in self.limits))


def as_routing(routing: Routing | int, path: str = "int4_gemv") -> Routing:
    """``routing`` itself, or an int n as :meth:`Routing.up_to` (n, ``path``): the fixed row cap of
    ``--quant-gemv-max-tokens`` / ``--no-cpu-plan``."""
    return routing if isinstance(routing, Routing) else Routing.up_to(routing, path)


def int4_formats(routing: Routing, planes: int) -> Routing:
    """The routing an int4 weight of ``planes`` planes serves, after what this build and
    ``SPARKSERVE_INT4_KERNEL`` allow: without the weight-stationary kernel (unbuilt, or mode "0")
    ``int4_ws`` becomes torch's ``int4_gemv``; with it, ``int4_gemv`` becomes ``int4_ws`` under "all",
    and under "auto" for weights of two or more planes (the Q8_0 LM head: one pass instead of two GEMVs,
    1.15x faster at 1 row, bench_results/int4_cpu_quiet.json). Only the format changes, never the row
    limits: the plan decides how many rows a quantised path serves."""
    mode = kernel_mode()
    if mode == "0" or not int4_cpu.load():
        return routing.renamed({"int4_ws": "int4_gemv", "int4_ws_q8": "int4_gemv"})
    if mode == "all" or planes > 1:
        return routing.renamed({"int4_gemv": "int4_ws"})
    return routing


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

    def pack(self, dtype: torch.dtype, routing: Routing | int) -> Int4Weight:
        """The weight for the int4 kernels with activations in ``dtype``, routed by ``routing`` (an int n:
        torch's int4 GEMV up to n rows), keeping the formats its paths need (:func:`int4_formats`): the
        weight-stationary kernel's tiles for ``int4_ws``, packed planes for torch's
        ``_weight_int4pack_mm_for_cpu`` for ``int4_gemv``."""
        return self.pack_as(dtype, int4_formats(as_routing(routing), len(self.codes)))

    def pack_as(self, dtype: torch.dtype, routing: Routing) -> Int4Weight:
        """Like :meth:`pack`, with ``routing``'s paths as given (no fallback or override: the CPU plan
        times each path this way). Raises RuntimeError for ``int4_ws`` where its extension is not built."""
        if routing.paths & {"int4_ws", "int4_ws_q8"} and not int4_cpu.load():
            raise RuntimeError("the weight-stationary int4 kernel is not built (or SPARKSERVE_INT4_KERNEL=0)")
        kernel = (int4_cpu.repack_int4(self.codes, self.scales, self.zeros, dtype)
                  if "int4_ws" in routing.paths else None)
        kernel_q8 = None if "int4_ws_q8" not in routing.paths else kernel or int4_cpu.repack_int4_q8(
            self.codes, self.scales, self.zeros, dtype)  # one tile layout serves both kernels
        planes = []
        if "int4_gemv" in routing.paths:
            for codes, scales, zeros in zip(self.codes, self.scales, self.zeros, strict=True):
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
                sz = torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous()  # [K/32, N, 2]
                planes.append((packed, sz))
        return Int4Weight(tuple(planes), dtype, routing, kernel, kernel_q8)


class Int4Weight:
    """One int4 linear weight [N, K] in the formats its routing uses: packed planes for torch's kernel
    (``planes``), tiles for the weight-stationary kernel (``kernel``) and / or for its int8-dot variant
    (``kernel_q8``); :meth:`__call__` is
    ``x @ w.T`` on the path :meth:`path_for` names."""

    def __init__(self, planes: tuple[tuple[torch.Tensor, torch.Tensor], ...], dtype: torch.dtype,
                 routing: Routing, kernel: int4_cpu.PackedInt4 | None = None,
                 kernel_q8: int4_cpu.PackedInt4 | None = None) -> None:
        held = {name for name, fmt in (("int4_gemv", planes), ("int4_ws", kernel), ("int4_ws_q8", kernel_q8))
                if fmt is not None and fmt != ()}
        if not routing.paths <= held:
            raise ValueError(f"routing {routing.limits} uses {sorted(routing.paths - held)}, not packed")
        self.planes = planes
        self.dtype = dtype
        self.routing = routing
        self.kernel = kernel
        self.kernel_q8 = kernel_q8

    def path_for(self, rows: int) -> str:
        """The path a call of ``rows`` rows takes: "dense" (the GEMM on the dense copy) or an int4 path."""
        return self.routing.path_for(rows)

    def invariant_path(self, rows: int) -> str | None:
        """The path of a call of ``rows`` rows in batch-invariant mode (engine/batch_invariant.py), or None
        (the dense fixed-tile GEMM). Only kernels that compute the canonical product bit for bit at every
        row count: ``int4_ws``, and ``int4_gemv`` where ``int4_kernels_agree`` (then the routing's choice
        between them stands). Beyond the routing's quantised rows: ``int4_ws`` if held, else ``int4_gemv``."""
        held = [p for p, fmt in (("int4_ws", self.kernel), ("int4_gemv", self.planes)) if fmt]
        if "int4_gemv" in held and not int4_kernels_agree(self.dtype):
            held.remove("int4_gemv")
        routed = self.routing.path_for(rows)
        return routed if routed in held else (held[0] if held else None)

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """x: [M, K] -> [M, N] in the weight's activation dtype, on ``path`` (default: :meth:`path_for`;
        "dense" is not served here)."""
        path = path or self.path_for(x.shape[0])
        a = x if x.dtype == self.dtype else x.to(self.dtype)
        if path == "int4_ws":
            assert self.kernel is not None
            return int4_cpu.int4_mm(a, self.kernel)
        if path == "int4_ws_q8":
            assert self.kernel_q8 is not None
            return int4_cpu.int4_q8_mm(a, self.kernel_q8)
        if path != "int4_gemv" or not self.planes:
            raise ValueError(f"Int4Weight cannot serve path {path!r} (formats: {sorted(self.routing.paths)})")
        out = None
        for packed, sz in self.planes:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, GROUP, sz)
            out = part if out is None else out + part
        assert out is not None
        return out

    def nbytes(self) -> int:
        """Bytes of the packed codes and the scales / zeros of every format kept."""
        kernels = [self.kernel, *([self.kernel_q8] if self.kernel_q8 is not self.kernel else [])]
        total = sum(k.nbytes() for k in kernels if k is not None)
        return total + sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in self.planes)


class Int8Weight:
    """Per-output-channel symmetric int8 weight for ``torch._weight_int8pack_mm``: ``w = q * scale``;
    every quantised path of its routing is served by that kernel."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, routing: Routing | int) -> None:
        self.codes = codes.contiguous()  # int8 [N, K]
        self.scales = scales  # [N], activation dtype
        self.routing = as_routing(routing, "int8_gemv")

    def path_for(self, rows: int) -> str:
        """"int8_gemv" where the routing names a quantised path for ``rows`` rows, else "dense"."""
        return "dense" if self.routing.path_for(rows) == "dense" else "int8_gemv"

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """x: [M, K] -> [M, N]."""
        return torch._weight_int8pack_mm(x, self.codes, self.scales.to(x.dtype))

    def nbytes(self) -> int:
        """Bytes of the int8 codes and the scales."""
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


QuantWeight = Int4Weight | Int8Weight


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 quant: QuantWeight | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on the path ``quant``'s routing names for x's row count (asked per
    call; every path computes with the same canonical weight values). x: [M, K]. In batch-invariant mode
    (engine/batch_invariant.py) every row count of an int4 weight runs its int4 kernels that agree bit for
    bit (:meth:`Int4Weight.invariant_path`), any other weight the dense GEMM on a fixed row tile."""
    if batch_invariant.is_enabled():
        path = (quant.invariant_path(x.shape[0]) if isinstance(quant, Int4Weight) and x.device.type == "cpu"
                else None)
        if path is None:
            return batch_invariant.invariant_linear(x, weight, bias)
    elif quant is None or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    else:
        path = quant.path_for(x.shape[0])
    if path == "dense":
        return F.linear(x, weight, bias)
    out = quant(x, path)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if bias is None else out + bias


class QuantLinear(nn.Module):
    """An ``nn.Linear`` whose weight holds int4 canonical values, computed through :func:`quant_linear`
    (the routing's path per call). Same parameter names as ``nn.Linear`` (``weight`` [N, K], ``bias``)."""

    def __init__(self, linear: nn.Linear, routing: Routing | int) -> None:
        super().__init__()
        dtype = linear.weight.dtype
        block = quantize_int4(linear.weight.detach(), dtype)
        self.weight = nn.Parameter(block.canonical(dtype).to(dtype), requires_grad=False)  # [N, K]
        self.bias = linear.bias
        self.quant = block.pack(dtype, routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]."""
        out = quant_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.quant)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@torch.no_grad()
def quantize_linears_(module: nn.Module, routing: Routing | int) -> int:
    """Replace, in place, every ``nn.Linear`` under ``module`` whose in-features divide by 32 with a
    :class:`QuantLinear` (group-32 int4, routed by ``routing``; the drafter's linears under
    ``--quantization int4``). Returns how many were replaced."""
    replaced = 0
    for child in list(module.modules()):
        for leaf, linear in list(child.named_children()):
            if isinstance(linear, nn.Linear) and linear.in_features % GROUP == 0:
                setattr(child, leaf, QuantLinear(linear, routing))
                replaced += 1
    return replaced


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
        q = blocks[..., 2:34].copy().view(np.int8).reshape(n, k)
        return q8_planes(torch.from_numpy(q), torch.from_numpy(d))
    return None


def q8_planes(q: torch.Tensor, d: torch.Tensor) -> BlockQuant:
    """Q8_0 (``w = d * q``: q int8 [N, K], d float32 [N, K / 32]) as two int4 planes, exactly: with
    ``q + 128 = 16 h + l``, ``w = (h - 8) * 16 d + ((l - 8) * d + 8 d)`` (module docstring)."""
    u = q.to(torch.int16) + 128  # [N, K] in 0..255
    return BlockQuant(((u >> 4).to(torch.uint8), (u & 0x0F).to(torch.uint8)), (16.0 * d, d),
                      (torch.zeros_like(d), 8.0 * d))


def quantize_q8_planes(weight: torch.Tensor) -> BlockQuant:
    """Symmetric group-32 int8 of a dense [N, K] weight (GGUF Q8_0's rule: ``d = max|w| / 127`` per group,
    ``q = round(w / d)``) as :func:`q8_planes`: the two-plane weight a Q8_0 LM head is served as (the CPU
    plan times that shape with it)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)
    d = (w.abs().amax(-1) / 127).clamp_min(1e-8)  # [N, K / 32]
    q = torch.round(w / d[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q8_planes(q, d)


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


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype,
                  routing: Routing | int) -> tuple[Int8Weight, torch.Tensor]:
    """Symmetric per-output-channel int8 of a dense [N, K] weight. Returns the kernel weight and the
    canonical dequantised values ``q * scale`` (float32 [N, K], scale rounded to ``dtype``)."""
    w = weight.float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8).to(dtype)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scale, routing), codes.float() * scale.float()[:, None]


# int4_kernels_agree's probe: K values of the served models (SmolLM2: 576, 1536), N (a multiple of 16, torch's
# packing rule) with a partial 64-column
# tile, and row counts across both kernels' tilings (1-17 rows, the L1-buffer path, ATen's 4-row blocks)
_PROBE_SHAPES = ((96, 576), (80, 1536))
_PROBE_ROWS = (*range(1, 18), 64, 257)


@functools.cache
def int4_kernels_agree(dtype: torch.dtype) -> bool:
    """Whether torch's int4 kernel (``_weight_int4pack_mm_for_cpu``) gives, for activations in ``dtype``,
    the bits of the weight-stationary kernel at every probed row count (``_PROBE_SHAPES`` x
    ``_PROBE_ROWS``, random group-32 weights; once per process and dtype, at the first int4 call in the
    mode: 2.8-4.7 s for bf16 and fp32 together on the shared machine at load 8-11, not timed idle). Both then compute the
    canonical product (one fp32 fma per weight and row, in increasing k) and the mode may serve a weight
    with either at any row count. False where the weight-stationary kernel is not built, and on ATen's
    unvectorised path (``ATEN_CPU_CAPABILITY=default``: measured, it differs from the canonical product in
    about one output of 10^5, too rarely for a small probe to see). Measured True on AVX-512 and AVX2,
    bf16 and fp32.
    """
    from sparkserve.kernels import int4_cpu

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or not int4_cpu.load():
        return False
    generator = torch.Generator().manual_seed(0)
    both = Routing(((1 << 30, "int4_gemv"),))
    for n, k in _PROBE_SHAPES:
        block = quantize_int4(torch.randn(n, k, generator=generator), dtype)
        gemv = block.pack_as(dtype, both)
        packed = int4_cpu.repack_int4(block.codes, block.scales, block.zeros, dtype)
        x = torch.randn(max(_PROBE_ROWS), k, generator=generator).to(dtype)  # [M, K]
        for rows in _PROBE_ROWS:
            if not torch.equal(gemv(x[:rows], "int4_gemv"), int4_cpu.int4_mm(x[:rows], packed)):
                return False
    return True
