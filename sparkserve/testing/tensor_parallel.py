"""Picklable model builds for tensor-parallel tests: every rank calls the same function and gets the same
weights (``EngineCore(build=functools.partial(tiny_build, ...))``)."""

from __future__ import annotations

from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.testing.tiny import random_dspark, tiny_target


def tiny_build(speculate: bool, seed: int = 0) -> tuple[LoadedModel, Drafter | None]:
    """The tiny random fp32 target (4 query heads, 2 KV heads, vocab 61: divides by 2, not by 3) and, when
    ``speculate``, a random DSpark drafter (block 4) on its heads."""
    target = tiny_target(seed=seed)
    return target, random_dspark(target, block_size=4, seed=seed + 1) if speculate else None
