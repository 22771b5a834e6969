"""Fused CPU ops of a small step's decoder layer (kernels/cpu/fused_decode.cpp): what lies between the linears.

At one decode row a layer's arithmetic outside its four linears is tiny, yet eager torch runs it as ~25 ops,
each paying dispatch and allocation; the fused step (engine/models/llama.py: ``DecoderLayer.forward_fused``)
runs it as three ops per layer:

- :func:`add_rms_norm`: residual add and RMSNorm, ``x' = x + delta``, ``h = w * rms_norm(x')``; x, delta [T, d].
- :func:`silu_mul`: ``silu(gate) * up`` of the fused gate | up projection; [T, 2 I] -> [T, I].
- :func:`rope_store_attend`: q / k norm (Qwen3), rotate-half RoPE on q and k, k and v stored into the paged
  KV cache, causal attention of every query row over keys 0 .. its position through its sequence's block
  table; qkv [T, (H + 2 Hkv) hd] -> [T, H, hd].

Every intermediate the eager path rounds to the model dtype is rounded at the same point; sums accumulate in
fp32 in another order than ATen's, so results agree with eager to fp32 rounding, not bit for bit (greedy
text by DESIGN.md section 7's near-tie rule). The same idea as llama.cpp's fused CPU graph ops.

Build: ``python -m sparkserve.kernels.fused_cpu`` (scripts/setup.sh runs it) compiles once into
``$SPARKSERVE_KERNEL_CACHE`` (default ``~/.cache/sparkserve/kernels``), a folder named after the hash of
the source, the torch version and its own flags. :func:`load` never compiles: without the library it logs one
warning and returns False, and the layers run eagerly. ``SPARKSERVE_FUSED_STEP=0`` disables the fused step;
``SPARKSERVE_FUSED_ISA=avx512|avx2|baseline`` forces the hot loops' code path (:data:`ISAS`; an emulated AVX2
machine sets it beside ``ATEN_CPU_CAPABILITY=avx2``).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

from sparkserve.kernels import cpp_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "cpu" / "fused_decode.cpp"
EXTENSION = "sparkserve_fused_cpu"
ISAS = ("avx512", "avx2", "baseline")
"""The hot loops' code paths, widest first: ``SPARKSERVE_FUSED_ISA`` forces one (read per call; a RuntimeError
when the CPU lacks it), else the widest the CPU has. The three give the same bits."""
X86 = platform.machine().lower() in ("x86_64", "amd64")
CFLAGS = ("-fno-trapping-math",)
"""No FP trap is ever read, so GCC may if-convert the selects of the branch-free exp and bf16 rounding and vectorise
their loops (values unchanged: no reassociation, no contraction)."""


def library_path() -> Path:
    """The compiled library: one folder per (source, torch version) under the kernel cache."""
    return cpp_build.library_path(SOURCE, "fused_cpu", EXTENSION, CFLAGS)


def build(verbose: bool = False) -> Path:
    """Compile the extension (the install step runs this; kernels/cpp_build.py: ``-ffp-contract=off`` keeps
    each rounding point the eager ops'). Returns the library's path; raises whatever
    torch.utils.cpp_extension raises when no compiler works."""
    return cpp_build.build(SOURCE, "fused_cpu", EXTENSION, verbose, CFLAGS)


@functools.cache
def load() -> bool:
    """Load the built library (never compiles). False, with one warning, when absent or disabled."""
    if os.environ.get("SPARKSERVE_FUSED_STEP", "1") == "0":
        return False
    if hasattr(torch.ops.sparkserve_fused, "add_rms_norm"):
        return True
    path = library_path()
    if not path.exists():
        logger.warning("fused CPU step not built (%s missing; run scripts/setup.sh or "
                       "`python -m sparkserve.kernels.fused_cpu`): the layers run eagerly", path)
        return False
    torch.ops.load_library(str(path))
    return True


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, weight * rms_norm(x + delta))``; x, delta [T, d] contiguous, weight [d], one dtype.
    Without ``delta`` the first output is a copy of x. Raises RuntimeError on other shapes / dtypes."""
    return torch.ops.sparkserve_fused.add_rms_norm.default(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; gate_up [T, 2 I] (gate | up) -> [T, I]."""
    return torch.ops.sparkserve_fused.silu_mul.default(gate_up)


def rope_store_attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, positions: torch.Tensor, q_index: torch.Tensor,
                      q_valid: torch.Tensor, block_tables: torch.Tensor, num_heads: int, num_kv_heads: int,
                      scale: float) -> torch.Tensor:
    """RoPE, KV store and causal paged attention of a step whose every sequence is short.

    Args:
        qkv: [T, (H + 2 Hkv) hd] the fused projection's output (q | k | v).
        cos, sin: [T, hd / 2] (or [T, 1, hd / 2]) RoPE tables at the rows' positions, qkv's dtype.
        q_norm, k_norm: [hd] per-head RMSNorm weights (Qwen3) or None.
        k_cache, v_cache: [Hkv, num_blocks, block_size, hd], written at ``slot_mapping`` [T].
        positions: [T] absolute positions (row t sees keys 0 .. positions[t] of its sequence).
        q_index, q_valid: [S, q_max] rows of each sequence and which are real (engine.attention's short group).
        block_tables: [S, max_blocks] int64.
    Returns:
        [T, H, hd] in qkv's dtype. Raises RuntimeError on inconsistent shapes or dtypes.
    """
    return torch.ops.sparkserve_fused.rope_store_attend.default(  # .default: no overload resolution per call
        qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping, positions, q_index, q_valid,
        block_tables, num_heads, num_kv_heads, scale)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print("fused CPU step built:", build(verbose=False))
