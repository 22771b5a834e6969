"""Weight-stationary int4 GEMM on the CPU (kernels/cpu/int4_gemm.cpp): ``x [M, K] @ w[N, K].T -> [M, N]``.

The weight is one or more group-32 int4 planes (engine/quant.py's ``BlockQuant``: GGUF Q4_0 / Q4_1, Q8_0 as
two planes, load-time int4) whose value is the canonical one, per plane ``fma(q - 8, scale, zero)`` rounded
once to fp32 with scale and zero first rounded to the serving dtype, planes summed in fp32. Each output
element is one fp32 accumulator updated by ``fma(x[m, k], w[n, k], acc)`` for k = 0 .. K - 1 in order,
then rounded to the output dtype, on every code path: AVX-512, AVX2 + FMA and a portable C++ loop, chosen
at run time from the CPU's flags. A row's output bits therefore depend neither on M, nor on the other rows,
nor on the thread count or ISA (batch-invariant by construction), and equal :func:`int4_mm_reference`,
which emulates the fused multiply-add exactly in float64 with round-to-odd (Boldo and Melquiond,
"Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008).

Build: ``python -m sparkserve.kernels.int4_cpu`` (scripts/setup.sh runs it) compiles the extension once with
torch.utils.cpp_extension into ``$SPARKSERVE_KERNEL_CACHE`` (default ``~/.cache/sparkserve/kernels``), in a
folder named after the hash of the source and the torch version. At run time :func:`load` only loads that
library; when it is absent (no compiler at install time) it logs one warning and returns False, and the
engine keeps torch's int4 kernel. Environment: ``SPARKSERVE_INT4_KERNEL=0`` disables the kernel;
``SPARKSERVE_INT4_ISA=avx512|avx2|portable`` forces a code path (an error if the CPU lacks it).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from sparkserve.kernels import cpp_build

logger = logging.getLogger(__name__)

GROUP = 32  # inputs per scale / zero (the GGUF block)
BLOCK_N = 64  # output channels per packed tile
SOURCE = Path(__file__).parent / "cpu" / "int4_gemm.cpp"
EXTENSION = "sparkserve_int4_cpu"
ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
AUTO_ISA = -1  # the extension reads SPARKSERVE_INT4_ISA, else takes the widest path the CPU has
DIRECT_MAX_ROWS = 16  # register passes up to this many rows (AVX2: 2, two planes: 8), else the L1 buffer


class PackedInt4(NamedTuple):
    """A weight [n, k] repacked for the kernels (kernels/cpu/int4_gemm.cpp describes the tile layout).

    Attributes:
        codes: uint8 [P, ceil(n / 64), k / 32, 4, 64, 4] (:func:`repack_int4`); padding channels hold code 8
            (weight 0).
        scales: float32 [P, ceil(n / 64), k / 32, 64], rounded to the serving dtype.
        zeros: float32, like scales.
        n: output channels; k: input features.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    n: int
    k: int

    def nbytes(self) -> int:
        """Bytes of the codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


# --------------------------------------------------------------------------- build and load
def build_dir() -> Path:
    """Where the compiled extension lives: one folder per (source, torch version)."""
    return library_path().parent


def library_path() -> Path:
    """The shared library :func:`build` writes."""
    return cpp_build.library_path(SOURCE, "int4_cpu", EXTENSION)


def build(verbose: bool = False) -> Path:
    """Compile the extension (once; the install step runs this; kernels/cpp_build.py). Returns the library's
    path. Raises whatever torch.utils.cpp_extension raises when no compiler works."""
    return cpp_build.build(SOURCE, "int4_cpu", EXTENSION, verbose)


@functools.cache
def load() -> bool:
    """Load the built library (never compiles). False, with one warning, when it is absent or disabled."""
    if os.environ.get("SPARKSERVE_INT4_KERNEL", "1") == "0":
        return False
    return hasattr(torch.ops.sparkserve_int4, "int4_mm") or load_library(library_path())


def load_library(path: Path) -> bool:
    """Load the compiled extension at ``path``; False, with a warning, when the file is absent."""
    if not path.exists():
        logger.warning("int4 CPU kernel not built (%s missing; run scripts/setup.sh or "
                       "`python -m sparkserve.kernels.int4_cpu`): using torch's int4 kernel", path)
        return False
    torch.ops.load_library(str(path))
    _register_fake()
    return True


def _register_fake() -> None:
    """Shape-only implementation, so torch.compile traces through the op."""

    @torch.library.register_fake("sparkserve_int4::int4_mm")
    def _(x, codes, scales, zeros, n, out_dtype, isa, direct_max_rows):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], n), dtype=out_dtype)


def supported_isas() -> tuple[str, ...]:
    """The code paths this CPU can run (needs :func:`load`)."""
    flags = torch.ops.sparkserve_int4.isa_flags()
    return tuple(name for name, bit in ISAS.items() if flags >> bit & 1)


def selected_isa() -> str:
    """``SPARKSERVE_INT4_ISA`` if set, else the widest path the CPU has (needs :func:`load`)."""
    forced = os.environ.get("SPARKSERVE_INT4_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"SPARKSERVE_INT4_ISA must be one of {sorted(ISAS)}, got {forced!r}")
        return forced
    return _best_isa()


@functools.cache
def _best_isa() -> str:
    best = torch.ops.sparkserve_int4.best_isa()
    return next(name for name, bit in ISAS.items() if bit == best)


# --------------------------------------------------------------------------- repack and wrapper
def repack_int4(codes: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...], zeros: tuple[torch.Tensor, ...],
                dtype: torch.dtype) -> PackedInt4:
    """Planes of uint8 codes [N, K] (0..15) with float32 scales / zeros [N, K / 32] -> the kernels' tiles
    (one layout for :func:`int4_mm` and :func:`int4_q8_mm`): codes uint8 [P, ceil(N / 64), K / 32, 4, 64, 4],
    byte (t, c, b) = code of input 8 t + b | code of input 8 t + 4 + b << 4 of channel c (the eight codes
    of inputs 8 t .. 8 t + 7 of one channel in one 32-bit lane: one shift brings each to the low bits, as
    vpermps reads them, and four consecutive inputs per lane are what vpdpbusd / maddubs consume); scales and
    zeros rounded to ``dtype`` (the serving dtype) as the canonical weights define."""

    def layout(c: torch.Tensor, tiles: int, k: int) -> torch.Tensor:  # [Np, K] -> [NB, G, 4, 64, 4]
        c = c.reshape(tiles, BLOCK_N, k // GROUP, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # [NB, G, t, 64, b, half]
        return c[..., 0] | (c[..., 1] << 4)

    return _repack(codes, scales, zeros, dtype, layout)


repack_int4_q8 = repack_int4  # the int8-dot variant reads the same tiles


def _repack(codes: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...], zeros: tuple[torch.Tensor, ...],
            dtype: torch.dtype, layout: Callable[[torch.Tensor, int, int], torch.Tensor]) -> PackedInt4:
    """Pad N to whole 64-channel tiles (code 8, scale and zero 0: weight 0), lay each plane's codes out
    with ``layout`` and its scales / zeros as [NB, G, 64] (rounded to ``dtype``), stack the planes."""
    n, k = codes[0].shape
    if k % GROUP:
        raise ValueError(f"int4 weights need K divisible by {GROUP}, got {k}")
    tiles, pad = -(-n // BLOCK_N), -n % BLOCK_N
    packed_codes, packed_s, packed_z = [], [], []
    for c, s, z in zip(codes, scales, zeros, strict=True):
        packed_codes.append(layout(torch.nn.functional.pad(c.to(torch.uint8), (0, 0, 0, pad), value=8), tiles, k))
        for src, dst in ((s, packed_s), (z, packed_z)):
            v = torch.nn.functional.pad(src.to(dtype).float(), (0, 0, 0, pad))  # [Np, G]
            dst.append(v.reshape(tiles, BLOCK_N, k // GROUP).transpose(1, 2))  # [NB, G, 64]
    return PackedInt4(torch.stack(packed_codes).contiguous(), torch.stack(packed_s).contiguous(),
                      torch.stack(packed_z).contiguous(), n, k)


def _check_x(x: torch.Tensor, weight: PackedInt4, out_dtype: torch.dtype | None) -> torch.dtype:
    """Both wrappers' input checks, in Python (the extension makes the same ones); returns the output dtype.
    Raises ValueError / RuntimeError as they say."""
    if x.ndim != 2 or x.shape[1] != weight.k:
        raise ValueError(f"x must be [M, {weight.k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"x must be a float32 / bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    if not load():
        raise RuntimeError("the int4 CPU kernel is not available (see the warning logged by load())")
    return out_dtype


def int4_mm(x: torch.Tensor, weight: PackedInt4, out_dtype: torch.dtype | None = None,
            isa: str | None = None, direct_max_rows: int = DIRECT_MAX_ROWS) -> torch.Tensor:
    """x [M, K] (float32 / bfloat16, CPU) @ weight.T -> [M, N] in ``out_dtype`` (default x's dtype).
    ``isa`` forces a code path (default :func:`selected_isa`, resolved in the extension);
    ``direct_max_rows`` (AVX-512, AVX2): calls of at most this many rows run the register passes, larger
    ones the L1-buffer path (same bits). Raises ValueError on a bad input and RuntimeError when the
    extension is not loaded or the CPU lacks the path."""
    if not load():
        raise RuntimeError("the int4 CPU kernel is not available (see the warning logged by load())")
    try:  # the extension checks every input; the checks here only run to name what was wrong
        return torch.ops.sparkserve_int4.int4_mm.default(x, weight.codes, weight.scales, weight.zeros, weight.n,
                                                         out_dtype or x.dtype, ISAS[isa] if isa else AUTO_ISA,
                                                         direct_max_rows)
    except (RuntimeError, NotImplementedError):
        _explain(x, weight, out_dtype, isa)
        raise


def _explain(x: torch.Tensor, weight: PackedInt4, out_dtype: torch.dtype | None, isa: str | None) -> None:
    """After the extension refused a call: raise the ValueError naming a bad input, if there is one."""
    _check_x(x, weight, out_dtype)
    if isa is None:
        selected_isa()


def supported_q8_isas() -> tuple[str, ...]:
    """The int8-dot kernel's code paths this CPU can run ("avx512" needs AVX-512 VNNI and BW; needs :func:`load`)."""
    flags = torch.ops.sparkserve_int4.q8_isa_flags()
    return tuple(name for name, bit in ISAS.items() if flags >> bit & 1)


def int4_q8_mm(x: torch.Tensor, weight: PackedInt4, out_dtype: torch.dtype | None = None,
               isa: str | None = None) -> torch.Tensor:
    """The int8-dot variant (kernels/cpu/int4_gemm.cpp): x [M, K] quantised to int8 per row and group of 32,
    integer dot products with the int4 codes, fp32 scales -> [M, N] in ``out_dtype`` (default x's dtype).
    Lossy against :func:`int4_mm` (x rounded to 8 bits per group); batch-invariant, the same bits on every
    path. ``weight`` from :func:`repack_int4_q8`. ``isa``: default ``SPARKSERVE_INT4_ISA``, else the widest of
    :func:`supported_q8_isas`. Raises ValueError on a bad input, RuntimeError when the extension is not
    loaded or the CPU lacks the path."""
    if not load():
        raise RuntimeError("the int4 CPU kernel is not available (see the warning logged by load())")
    try:
        return torch.ops.sparkserve_int4.int4_q8_mm.default(x, weight.codes, weight.scales, weight.zeros, weight.n,
                                                            out_dtype or x.dtype, ISAS[isa] if isa else AUTO_ISA)
    except (RuntimeError, NotImplementedError):
        _explain(x, weight, out_dtype, isa)
        raise


# --------------------------------------------------------------------------- pure-torch reference
def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``a * b + c`` (broadcasting float32 tensors): the product is exact in
    float64, the sum is rounded to odd in float64 (53 >= 24 + 2 bits), then to nearest float32
    (Boldo and Melquiond 2008, Theorem 3)."""
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    bp = s - p
    err = (p - (s - bp)) + (cd - bp)  # TwoSum: s + err == p + c exactly
    inexact_even = (err != 0) & ((s.view(torch.int64) & 1) == 0)
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    return torch.where(inexact_even, torch.nextafter(s, toward), s).float()


def int4_mm_reference(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The kernel's arithmetic in torch: x [M, K] (float32 / bfloat16) and the canonical float32 weight
    [N, K] -> [M, N] in ``out_dtype`` (default x's dtype); one fp32 accumulator per output, fma in
    increasing k from +0. Slow (K steps): tests only."""
    xf = x.float()
    acc = torch.zeros(x.shape[0], weight.shape[0])  # [M, N]
    for k in range(x.shape[1]):
        acc = fma32(xf[:, k, None], weight[None, :, k], acc)
    return acc.to(out_dtype or x.dtype)


def quantize_activations_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8-dot kernel's activation quantisation: x [M, K] -> (xq float32 [M, K / 32, 32] integers in
    -127..127, d float32 [M, K / 32]) with d = max|x| / 127 per group and xq = round-half-even(x / d)."""
    xg = x.float().reshape(x.shape[0], -1, GROUP)  # [M, G, 32]
    d = xg.abs().amax(-1) / 127  # [M, G]
    safe = torch.where(d > 0, d, torch.ones_like(d))
    xq = torch.where(d[..., None] > 0, torch.round(xg / safe[..., None]), torch.zeros_like(xg)).clamp(-127, 127)
    return xq, d


def int4_q8_mm_reference(x: torch.Tensor, codes: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...],
                         zeros: tuple[torch.Tensor, ...], dtype: torch.dtype,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The int8-dot kernel's arithmetic in torch: x [M, K]; per plane uint8 codes [N, K] and float32 scales /
    zeros [N, K / 32] (rounded to ``dtype`` first, as the repack does) -> [M, N] in ``out_dtype``: integer
    dots exact in float64, then per group and plane ``acc = fma(d, fma(s, D - 8 S, z * S), acc)`` in fp32."""
    xq, d = quantize_activations_q8(x)  # [M, G, 32], [M, G]
    sums = xq.sum(-1)  # [M, G], exact integers
    acc = torch.zeros(x.shape[0], codes[0].shape[0])  # [M, N]
    planes = []
    for c, s, z in zip(codes, scales, zeros, strict=True):
        q = c.double().reshape(c.shape[0], -1, GROUP)  # [N, G, 32]
        dots = torch.einsum("mgk,ngk->mng", xq.double(), q)  # [M, N, G], exact (|D| < 2^16)
        t = (dots - 8 * sums.double()[:, None, :]).float()
        u = z.to(dtype).float()[None] * sums[:, None, :]  # [M, N, G] fp32 product
        planes.append(fma32(s.to(dtype).float()[None].expand_as(t), t, u))
    for g in range(d.shape[1]):
        for v in planes:
            acc = fma32(d[:, None, g].expand_as(acc), v[:, :, g], acc)
    return acc.to(out_dtype or x.dtype)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print("int4 CPU kernel built:", build(verbose=False))
