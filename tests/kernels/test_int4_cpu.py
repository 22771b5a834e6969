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

from sparkserve.engine.quant import Routing, gguf_block_quant, quant_linear
from sparkserve.kernels import int4_cpu
from sparkserve.kernels.int4_cpu import fma32, int4_mm, int4_mm_reference, repack_int4
from sparkserve.testing.int4_blocks import random_block

DTYPES = [torch.float32, torch.bfloat16]


def _isa(name: str) -> str:
    if name not in int4_cpu.supported_isas():
        pytest.skip(f"this CPU has no {name} path")
    return name


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
@pytest.mark.parametrize(("isa", "direct_max_rows"), [("avx512", 16), ("avx512", 0), ("avx2", 16), ("avx2", 0),
                                                        ("portable", 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "planes"), [(101, 160, 1), (37, 96, 2), (130, 32, 1)])
def test_every_row_count_equals_reference(kernel, isa, direct_max_rows, dtype, n, k, planes) -> None:
    """M = 1..16 (and 37, the tiled path), odd N (tile tails) and odd group counts, 1 or 2 planes, the
    AVX-512 and AVX2 register passes and their L1-buffer paths: bit-identical to the reference; every row of an M-row
    call equals that row's reference, so rows are independent of M (the reference is computed once)."""
    _isa(isa)
    block = random_block(n, k, planes)
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
    block = random_block(576, 576, 1, seed=3)
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
    block = random_block(64, 64, 1)
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
    assert torch.equal(int4_mm(torch.ones(2, 64), packed), int4_mm(torch.ones(2, 64), packed, isa="avx2"))
    monkeypatch.setenv("SPARKSERVE_INT4_ISA", "sse")
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_ISA"):
        int4_cpu.selected_isa()
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_ISA"):  # the extension reads it per call
        int4_mm(torch.ones(2, 64), packed)


# --------------------------------------------------------------------------- engine wiring and fallback
def test_quant_linear_uses_kernel(kernel, monkeypatch) -> None:
    """Formats follow the routing's paths: ``auto`` keeps one-plane weights on torch's kernel where the
    routing says int4_gemv and puts two-plane ones on this kernel, with the routing's row limits (no cap
    of its own); ``all``: every int4 path on this kernel; ``0``: none; a routing of no rows is always dense."""
    one_plane = random_block(64, 64, 1)
    assert one_plane.pack(torch.bfloat16, 4).kernel is None
    block = random_block(96, 128, 2, seed=5)
    auto = block.pack(torch.bfloat16, 4)
    assert auto.kernel is not None and auto.planes == ()
    assert auto.path_for(4) == "int4_ws" and auto.path_for(5) == "dense"
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "0")
    assert block.pack(torch.bfloat16, 4).kernel is None
    assert block.pack(torch.bfloat16, Routing.up_to(8, "int4_ws")).path_for(8) == "int4_gemv"
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "bogus")
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_KERNEL"):
        block.pack(torch.bfloat16, 4)
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "all")
    assert one_plane.pack(torch.bfloat16, 4).kernel is not None
    weight = block.canonical(torch.bfloat16)
    quant = block.pack(torch.bfloat16, 16)
    assert quant.kernel is not None and quant.planes == ()
    assert quant.path_for(16) == "int4_ws" and quant.path_for(17) == "dense"
    assert block.pack(torch.bfloat16, 0).path_for(1) == "dense"  # 0 still means always dense
    x = _x(16, 128, torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    out = quant_linear(x, weight.to(torch.bfloat16), bias, quant)
    assert torch.equal(out, int4_mm_reference(x, weight) + bias)


def test_quant_linear_asks_the_routing_per_call(kernel, monkeypatch) -> None:
    """A plan's routing mixing paths by row count: each call takes its bucket's path (int4_ws bit-exact
    to the reference, torch's int4 GEMV and the dense GEMM close to it), and the weight keeps both formats."""
    block = random_block(80, 96, 1, seed=7)
    weight = block.canonical(torch.bfloat16)  # [80, 96]
    routing = Routing(((2, "int4_gemv"), (8, "int4_ws"), (16, "dense"), (32, "int4_ws")))
    quant = block.pack(torch.bfloat16, routing)
    assert quant.kernel is not None and len(quant.planes) == 1
    calls: list[int] = []
    real = int4_cpu.int4_mm

    def spy(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(int4_cpu, "int4_mm", spy)
    for m in (1, 2, 3, 8, 9, 16, 17, 32, 33):
        x = _x(m, 96, torch.bfloat16, seed=m)
        out = quant_linear(x, weight.to(torch.bfloat16), None, quant)  # [m, 80]
        expected = int4_mm_reference(x, weight)
        if routing.path_for(m) == "int4_ws":
            assert torch.equal(out, expected), m
        else:
            torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)
    assert calls == [3, 8, 17, 32]


def test_routing_checks_and_plan_conversion() -> None:
    """Routing limits are increasing row counts of known paths; a plan becomes the routing of its
    buckets with trailing dense buckets dropped; int4_ws is a registered, batch-invariant plan path."""
    from sparkserve.engine.cpu_plan import PATHS, CpuPlan

    with pytest.raises(ValueError, match="increasing"):
        Routing(((4, "int4_gemv"), (2, "int4_ws")))
    with pytest.raises(ValueError, match="unknown"):
        Routing(((4, "int4_fast"),))
    plan = CpuPlan("bfloat16", (1, 2, 4, 8, 16), ("int4_ws", "int4_gemv", "int4_ws", "dense", "dense"),
                   frozenset({"int4_ws", "int4_gemv"}))
    assert plan.routing() == Routing(((1, "int4_ws"), (2, "int4_gemv"), (4, "int4_ws")))
    assert [plan.routing().path_for(m) for m in (1, 2, 3, 5, 100)] == ["int4_ws", "int4_gemv", "int4_ws", "dense", "dense"]
    assert Routing.up_to(0).path_for(1) == "dense" and Routing.up_to(3).summary() == "int4_gemv<=3"
    assert PATHS["int4_ws"].quantized and PATHS["int4_ws"].batch_invariant


def test_drafter_linears_routed(kernel) -> None:
    """``quantize_linears_`` (the drafter's linears under ``--quantization int4``): every decoder-layer
    linear becomes a routed int4 linear whose weight holds the canonical values; the routed rows are
    bit-exact to the kernel's reference, the rest run the dense GEMM on the same values."""
    from sparkserve.engine.quant import QuantLinear, quantize_linears_
    from sparkserve.testing.tiny import random_dspark, tiny_target

    drafter = random_dspark(tiny_target())
    before = [m.weight.detach().clone() for m in drafter.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert quantize_linears_(drafter.layers, Routing.up_to(4, "int4_ws")) == len(before) == 7
    linears = [m for m in drafter.layers.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7
    for lin, w0 in zip(linears, before, strict=True):
        assert (lin.weight - w0).abs().max() <= w0.abs().max() / 15  # within half a code step of its group
        x = torch.randn(3, lin.weight.shape[1])
        assert torch.equal(lin(x), int4_mm_reference(x, lin.weight))  # 3 rows: routed to the kernel
        x = torch.randn(2, 5, lin.weight.shape[1])  # 10 rows: dense
        torch.testing.assert_close(lin(x), x @ lin.weight.t(), rtol=1e-5, atol=1e-5)


def test_fallback_without_extension(tmp_path, caplog) -> None:
    """Extension absent: load_library warns and says False; in a fresh process with an empty kernel
    cache, the engine packs for torch's kernel and computes the canonical product."""
    with caplog.at_level("WARNING"):
        assert not int4_cpu.load_library(tmp_path / "missing.so")
    assert "using torch's int4 kernel" in caplog.text
    script = (
        "import torch\n"
        "from sparkserve.engine.cpu_plan import PATHS\n"
        "from sparkserve.engine.quant import Routing, quantize_int4\n"
        "w = torch.randn(64, 96)\n"
        "block = quantize_int4(w, torch.float32)\n"
        "q = block.pack(torch.float32, 4)\n"
        "assert q.kernel is None and len(q.planes) == 1 and q.path_for(4) == 'int4_gemv' and q.path_for(5) == 'dense'\n"
        "ws = block.pack(torch.float32, Routing.up_to(8, 'int4_ws'))\n"  # the plan's int4_ws: torch's kernel
        "assert ws.kernel is None and ws.path_for(8) == 'int4_gemv'\n"
        "try:\n"
        "    PATHS['int4_ws'].build(w, torch.float32)\n"
        "    raise SystemExit('int4_ws built without the extension')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "x = torch.randn(3, 96)\n"
        "torch.testing.assert_close(q(x), x @ block.canonical(torch.float32).t(), rtol=1e-5, atol=1e-5)\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "SPARKSERVE_KERNEL_CACHE": str(tmp_path / "empty"), "SPARKSERVE_INT4_KERNEL": "all"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fallback ok" in run.stdout and "int4 CPU kernel not built" in run.stderr
