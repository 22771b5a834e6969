"""Random int4 block weights for the int4 kernel tests (engine/quant.py's ``BlockQuant``)."""

from __future__ import annotations

import torch

from sparkserve.engine.quant import BlockQuant


def random_block(n: int, k: int, planes: int = 1, seed: int = 0) -> BlockQuant:
    """A [n, k] weight of ``planes`` int4 planes: codes uniform in 0..15, scales in [1e-3, 2.1e-2),
    zeros ~ N(0, 0.05^2), one per group of 32 inputs (k divisible by 32)."""
    gen = torch.Generator().manual_seed(seed)
    return BlockQuant(
        tuple(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8) for _ in range(planes)),
        tuple(torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3 for _ in range(planes)),
        tuple(torch.randn(n, k // 32, generator=gen) * 0.05 for _ in range(planes)),
    )
