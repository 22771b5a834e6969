"""The weight-stationary int4 CPU kernel (kernels/int4_cpu.py, kernels/cpu/int4_gemm.cpp).

Every code path (AVX-512, AVX2 + FMA, portable) must equal the pure-torch reference bit for bit: both
compute one fp32 accumulator per output with correctly rounded fmas in increasing k. The AVX-512 path is
tested where the CPU has it (it ran on the AMD EPYC development machine, avx512f + avx512_bf16); elsewhere
its case is skipped with that reason. The extension is built on first use here (cached) when the install
step has not built it; without a compiler the kernel tests skip and the fallback tests still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from sparkserve.engine.quant import BlockQuant, gguf_block_quant, quant_linear
from sparkserve.kernels import int4_cpu
from sparkserve.kernels.int4_cpu import fma32, int4_mm, int4_mm_reference, repack_int4

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kernel() -> None:
    """The extension, loaded (built once into the cache if the install step did not)."""
    if not int4_cpu.load():
        try:
            int4_cpu.build()
        except Exception as exc:  # noqa: BLE001 - no compiler: the kernel cannot be tested here
            pytest.skip(f"int4 CPU kernel cannot be built here: {exc}")
        int4_cpu.load.cache_clear()
        assert int4_cpu.load()


def _isa(name: str) -> str:
    if name not in int4_cpu.supported_isas():
        pytest.skip(f"this CPU has no {name} path")
    return name


def _random_block(n: int, k: int, planes: int, seed: int = 0) -> BlockQuant:
    gen = torch.Generator().manual_seed(seed)
    return BlockQuant(
        tuple(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8) for _ in range(planes)),
        tuple(torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3 for _ in range(planes)),
        tuple(torch.randn(n, k // 32, generator=gen) * 0.05 for _ in range(planes)),
    )


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------- the exact fma emulation
def _round_to_fp32(value: Fraction) -> float:
    """Nearest float32 to an exact rational, ties to even."""
    guess = np.float32(float(value))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - value),
                                                int(np.array(c).view(np.int32)) & 1)))


def test_fma32_rounds_once() -> None:
    # exact a b + c = 1 + 2^-23 + 2^-24 - 2^-60: just below a float32 midpoint. Rounding the sum to float64
    # first lands on the midpoint (then ties-to-even goes up); the fma rounds down to 1 + 2^-23.
    a, b, c = 1 + 2.0**-18, 2.0**-24 * (1 - 2.0**-18), 1 + 2.0**-23
    t = [torch.tensor([v], dtype=torch.float32) for v in (a, b, c)]
    assert float((t[0].double() * t[1].double() + t[2].double()).float()) == 1 + 2.0**-22  # double rounding
    assert float(fma32(*t)) == 1 + 2.0**-23
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, generator=gen), torch.randn(2000, generator=gen)
    c = -(a * b) * (1 + torch.randn(2000, generator=gen) * 1e-6)  # heavy cancellation
    got = fma32(a, b, c)
    for i in range(0, 2000, 7):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert float(got[i]) == _round_to_fp32(exact)


# --------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize(("isa", "direct_max_rows"), [("avx512", 16), ("avx512", 0), ("avx2", 16), ("portable", 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "planes"), [(101, 160, 1), (37, 96, 2), (130, 32, 1)])
def test_every_row_count_equals_reference(kernel, isa, direct_max_rows, dtype, n, k, planes) -> None:
    """M = 1..16 (and 37, the tiled path), odd N (tile tails) and odd group counts, 1 or 2 planes, the
    AVX-512 register passes and its L1-buffer path: bit-identical to the reference; every row of an M-row
    call equals that row's reference, so rows are independent of M (the reference is computed once)."""
    _isa(isa)
    block = _random_block(n, k, planes)
    packed = repack_int4(block.codes, block.scales, block.zeros, dtype)
    x = _x(37, k, dtype)
    expected = int4_mm_reference(x, block.canonical(dtype))  # [37, n]
    for m in [*range(1, 17), 37]:
        out = int4_mm(x[:m], packed, isa=isa, direct_max_rows=direct_max_rows)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.equal(out, expected[:m]), f"M={m}"


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gguf_weights_equal_reference(kernel, name, dtype) -> None:
    """GGUF blocks (gguf-py's quantiser) through engine/quant.py's mapping: the kernel equals the
    reference on the canonical weights for every M (best path and AVX2), in fp32 and bf16 output."""
    rng = np.random.default_rng(0)
    dense = (rng.standard_normal((96, 192)) * 0.1 + rng.standard_normal((96, 1)) * 0.05).astype(np.float32)
    block = gguf_block_quant(quantize(dense, getattr(GGMLQuantizationType, name)), name, dense.shape)
    packed = repack_int4(block.codes, block.scales, block.zeros, dtype)
    x = _x(16, 192, dtype)
    expected = int4_mm_reference(x, block.canonical(dtype))
    for isa in {int4_cpu.selected_isa(), *(("avx2",) if "avx2" in int4_cpu.supported_isas() else ())}:
        for m in range(1, 17):
            assert torch.equal(int4_mm(x[:m], packed, isa=isa), expected[:m]), f"{isa} M={m}"
    out32 = int4_mm(x, packed, out_dtype=torch.float32)  # fp32 output of bf16 activations
    assert torch.equal(out32, int4_mm_reference(x, block.canonical(dtype), torch.float32))


def test_rows_independent_of_batch_and_threads(kernel) -> None:
    """Batch invariance on the default path: each row of a 16-row call equals the same row alone, with
    one thread and with two."""
    block = _random_block(576, 576, 1, seed=3)
    packed = repack_int4(block.codes, block.scales, block.zeros, torch.bfloat16)
    x = _x(16, 576, torch.bfloat16, seed=4)
    batched = int4_mm(x, packed)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([int4_mm(x[i:i + 1], packed) for i in range(16)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, alone)


def test_wrapper_checks_inputs(kernel, monkeypatch) -> None:
    block = _random_block(64, 64, 1)
    packed = repack_int4(block.codes, block.scales, block.zeros, torch.float32)
    with pytest.raises(ValueError, match="must be"):
        int4_mm(torch.randn(2, 32), packed)  # wrong K
    with pytest.raises(ValueError, match="float32 / bfloat16"):
        int4_mm(torch.randn(2, 64).half(), packed)
    with pytest.raises(ValueError, match="out_dtype"):
        int4_mm(torch.randn(2, 64), packed, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="K divisible"):
        repack_int4((torch.zeros(4, 40, dtype=torch.uint8),), (torch.ones(4, 1),), (torch.zeros(4, 1),), torch.float32)
    monkeypatch.setenv("SPARKSERVE_INT4_ISA", "avx2")
    assert int4_cpu.selected_isa() == "avx2"
    monkeypatch.setenv("SPARKSERVE_INT4_ISA", "sse")
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_ISA"):
        int4_cpu.selected_isa()


# --------------------------------------------------------------------------- engine wiring and fallback
def test_quant_linear_uses_kernel(kernel, monkeypatch) -> None:
    """Default: two-plane weights on the kernel up to 8 rows, one-plane ones on torch's; ``all``: every
    int4 weight up to 16 rows; ``0``: none; ``max_tokens = 0`` still means always dense."""
    one_plane = _random_block(64, 64, 1)
    assert one_plane.pack(torch.bfloat16, 4).kernel is None
    block = _random_block(96, 128, 2, seed=5)
    auto = block.pack(torch.bfloat16, max_tokens=4)
    assert auto.kernel is not None and auto.handles(8) and not auto.handles(9)
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "0")
    assert block.pack(torch.bfloat16, 4).kernel is None
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "bogus")
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_KERNEL"):
        block.pack(torch.bfloat16, 4)
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "all")
    assert one_plane.pack(torch.bfloat16, 4).kernel is not None
    weight = block.canonical(torch.bfloat16)
    quant = block.pack(torch.bfloat16, max_tokens=4)
    assert quant.kernel is not None and quant.planes == ()
    assert quant.handles(16) and not quant.handles(17)
    assert not block.pack(torch.bfloat16, max_tokens=0).handles(1)  # 0 still means always dense
    x = _x(16, 128, torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    out = quant_linear(x, weight.to(torch.bfloat16), bias, quant)
    assert torch.equal(out, int4_mm_reference(x, weight) + bias)


def test_fallback_without_extension(tmp_path, caplog) -> None:
    """Extension absent: load_library warns and says False; in a fresh process with an empty kernel
    cache, the engine packs for torch's kernel and computes the canonical product."""
    with caplog.at_level("WARNING"):
        assert not int4_cpu.load_library(tmp_path / "missing.so")
    assert "using torch's int4 kernel" in caplog.text
    script = (
        "import torch\n"
        "from sparkserve.engine.quant import quantize_int4\n"
        "w = torch.randn(64, 96)\n"
        "block = quantize_int4(w, torch.float32)\n"
        "q = block.pack(torch.float32, 4)\n"
        "assert q.kernel is None and len(q.planes) == 1 and q.handles(4) and not q.handles(5)\n"
        "x = torch.randn(3, 96)\n"
        "torch.testing.assert_close(q(x), x @ block.canonical(torch.float32).t(), rtol=1e-5, atol=1e-5)\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "SPARKSERVE_KERNEL_CACHE": str(tmp_path / "empty"), "SPARKSERVE_INT4_KERNEL": "all"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fallback ok" in run.stdout and "int4 CPU kernel not built" in run.stderr
