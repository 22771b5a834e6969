"""The int8-dot variant of the int4 CPU kernel (kernels/int4_cpu.py: int4_q8_mm): activations quantised
to int8 per row and group of 32, integer dots, fp32 scales.

Every code path (AVX-512 VNNI, AVX2, portable; forced by argument and by ``SPARKSERVE_INT4_ISA``) gives
bit for bit the pure-torch reference's output for M = 1..16 and 37, odd N, K tails of one group, one and
two planes (Q8_0), fp32 and bf16 activations; each row equals that row alone (batch-invariant); and the
result stays within the activation rounding of the exact kernel. The AVX-512 VNNI path ran here on an
AMD EPYC with avx512_vnni; it is skipped, with its reason, on CPUs without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from sparkserve.engine.quant import BlockQuant, gguf_block_quant
from sparkserve.kernels import int4_cpu
from sparkserve.kernels.int4_cpu import (
    int4_mm_reference,
    int4_q8_mm,
    int4_q8_mm_reference,
    quantize_activations_q8,
    repack_int4_q8,
)
from sparkserve.testing.int4_blocks import random_block

DTYPES = [torch.float32, torch.bfloat16]


def _isa(name: str) -> str:
    if name not in int4_cpu.supported_q8_isas():
        pytest.skip(f"this CPU has no {name} path for the int8-dot kernel (AVX-512 needs VNNI and BW)")
    return name


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0.0  # an all-zero group: d = 0
    return x.to(dtype)


def _reference(x: torch.Tensor, block: BlockQuant, dtype: torch.dtype) -> torch.Tensor:
    return int4_q8_mm_reference(x, block.codes, block.scales, block.zeros, dtype)


def test_activation_quantisation_rounds_half_even() -> None:
    """d = max|x| / 127 per group, xq = round-half-even(x / d); an all-zero group gives d = 0, xq = 0."""
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 0.5, 1.5
    xq, d = quantize_activations_q8(x)
    assert d.tolist() == [[1.0, 0.0]]
    assert xq[0, 0, :3].tolist() == [127.0, 0.0, 2.0] and not xq[0, 1].any()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "planes"), [(101, 160, 1), (37, 96, 2), (130, 32, 1)])
def test_every_row_count_equals_reference(kernel, isa, dtype, n, k, planes) -> None:
    """Bit-exact against the torch reference for M = 1..16 and 37 on each code path."""
    isa = _isa(isa)
    block = random_block(n, k, planes, seed=n + k)
    packed = repack_int4_q8(block.codes, block.scales, block.zeros, dtype)
    for m in [*range(1, 17), 37]:
        x = _x(m, k, dtype, seed=m)
        out = int4_q8_mm(x, packed, isa=isa)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.equal(out, _reference(x, block, dtype)), (isa, m)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_weights_equal_reference_on_every_path(kernel, name) -> None:
    """GGUF-derived weights (Q8_0 as two planes): every available path gives the same bits as the
    reference and as each other, also when forced through ``SPARKSERVE_INT4_ISA``."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 128)).astype(np.float32) * 0.1
    qtype = getattr(GGMLQuantizationType, name)
    block = gguf_block_quant(quantize(w, qtype), name, (70, 128))
    packed = repack_int4_q8(block.codes, block.scales, block.zeros, torch.bfloat16)
    x = _x(9, 128, torch.bfloat16, seed=4)
    expected = _reference(x, block, torch.bfloat16)
    for isa in int4_cpu.supported_q8_isas():
        assert torch.equal(int4_q8_mm(x, packed, isa=isa), expected), isa


def test_isa_forced_by_environment(kernel, monkeypatch) -> None:
    """``SPARKSERVE_INT4_ISA`` picks the path (read per call); an unknown name is a ValueError."""
    block = random_block(64, 64, 1, seed=2)
    packed = repack_int4_q8(block.codes, block.scales, block.zeros, torch.float32)
    x = _x(5, 64, torch.float32, seed=3)
    expected = _reference(x, block, torch.float32)
    for isa in int4_cpu.supported_q8_isas():
        monkeypatch.setenv("SPARKSERVE_INT4_ISA", isa)
        assert torch.equal(int4_q8_mm(x, packed), expected), isa
    monkeypatch.setenv("SPARKSERVE_INT4_ISA", "sse9")
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_ISA"):
        int4_q8_mm(x, packed)


def test_avx2_machine_emulated(kernel) -> None:
    """As on an AVX2-only CI machine: a fresh process with ``ATEN_CPU_CAPABILITY=avx2`` and
    ``SPARKSERVE_INT4_ISA=avx2`` (the engine's own weights, both int4 kernels on their default ISA, which
    the extension resolves from the variable per call) gives the references' bits; an unknown name there
    is refused with a ValueError."""
    if "avx2" not in int4_cpu.supported_q8_isas():
        pytest.skip("this CPU has no AVX2")
    script = (
        "import torch\n"
        "from sparkserve.engine.quant import Routing, quantize_int4\n"
        "from sparkserve.kernels import int4_cpu\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'\n"
        "block = quantize_int4(torch.randn(100, 96, generator=torch.Generator().manual_seed(0)), torch.bfloat16)\n"
        "w = block.pack(torch.bfloat16, Routing(((4, 'int4_ws'), (16, 'int4_ws_q8'))))\n"
        "x = torch.randn(16, 96, generator=torch.Generator().manual_seed(1)).bfloat16()\n"
        "exact = int4_cpu.int4_mm_reference(x[:4], block.canonical(torch.bfloat16))\n"
        "q8 = int4_cpu.int4_q8_mm_reference(x, block.codes, block.scales, block.zeros, torch.bfloat16)\n"
        "assert torch.equal(w(x[:4]), exact) and torch.equal(w(x), q8)\n"
        "print('avx2 ok')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "SPARKSERVE_INT4_ISA": "avx2"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "avx2 ok" in run.stdout, run.stderr
    env["SPARKSERVE_INT4_ISA"] = "avx3"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "SPARKSERVE_INT4_ISA must be one of" in run.stderr


def test_rows_independent_of_batch_and_threads(kernel) -> None:
    """Each row of a 16-row call equals that row computed alone, with 1 or 2 threads."""
    block = random_block(200, 256, 1, seed=9)
    packed = repack_int4_q8(block.codes, block.scales, block.zeros, torch.bfloat16)
    x = _x(16, 256, torch.bfloat16, seed=2)
    full = int4_q8_mm(x, packed)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for r in range(16):
            assert torch.equal(int4_q8_mm(x[r:r + 1], packed), full[r:r + 1]), r
    finally:
        torch.set_num_threads(threads)


def test_close_to_the_exact_kernel(kernel) -> None:
    """Lossy only by the activation rounding: within 2 % of the output scale of the exact product."""
    block = random_block(128, 576, 1, seed=11)
    packed = repack_int4_q8(block.codes, block.scales, block.zeros, torch.float32)
    x = _x(4, 576, torch.float32, seed=5)
    exact = int4_mm_reference(x, block.canonical(torch.float32))
    approx = int4_q8_mm(x, packed)
    assert (approx - exact).abs().max() <= 0.02 * exact.abs().max()
    assert not torch.equal(approx, exact)  # it is a different computation


def test_wrapper_checks_inputs(kernel) -> None:
    """Wrong K, dtype or an ISA the CPU lacks: a clear error before the kernel runs."""
    block = random_block(64, 64, 1)
    packed = repack_int4_q8(block.codes, block.scales, block.zeros, torch.float32)
    with pytest.raises(ValueError, match="must be"):
        int4_q8_mm(torch.randn(2, 32), packed)
    with pytest.raises(ValueError, match="float32 / bfloat16"):
        int4_q8_mm(torch.randn(2, 64).half(), packed)
    if "avx512" not in int4_cpu.supported_q8_isas():
        with pytest.raises(RuntimeError, match="not supported"):
            int4_q8_mm(torch.randn(2, 64), packed, isa="avx512")


def test_plan_offers_the_int8_dot_path_only_on_request(kernel, monkeypatch) -> None:
    """``int4_ws_q8`` is a registered, batch-invariant, not exact path: a plan candidate only under
    ``SPARKSERVE_INT4_ACTIVATIONS=int8``; a routing naming it serves those rows with the int8-dot kernel
    (the reference's bits) and falls back to torch's exact kernel with ``SPARKSERVE_INT4_KERNEL=0``."""
    from sparkserve.engine.cpu_plan import PATHS, candidate_paths
    from sparkserve.engine.quant import Routing, quant_linear

    assert PATHS["int4_ws_q8"].batch_invariant and not PATHS["int4_ws_q8"].exact
    assert "int4_ws_q8" not in candidate_paths("int4", "bfloat16", gguf=False)
    monkeypatch.setenv("SPARKSERVE_INT4_ACTIVATIONS", "int8")
    assert "int4_ws_q8" in candidate_paths("int4", "bfloat16", gguf=False)
    monkeypatch.setenv("SPARKSERVE_INT4_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="SPARKSERVE_INT4_ACTIVATIONS"):
        candidate_paths("int4", "bfloat16", gguf=False)
    block = random_block(80, 96, 1, seed=4)
    quant = block.pack(torch.bfloat16, Routing(((8, "int4_ws_q8"),)))
    assert quant.kernel_q8 is not None and quant.kernel is None and quant.planes == ()
    weight = block.canonical(torch.bfloat16).to(torch.bfloat16)
    x = _x(8, 96, torch.bfloat16, seed=6)
    assert torch.equal(quant_linear(x, weight, None, quant), _reference(x, block, torch.bfloat16))
    monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "0")
    assert block.pack(torch.bfloat16, Routing(((8, "int4_ws_q8"),))).path_for(8) == "int4_gemv"
