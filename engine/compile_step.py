"""Optional ``torch.compile`` of the decoder layers' bodies (``--compile``; off by default).

Each ``DecoderLayer`` runs ``pre_attention`` (norm, q/k/v projection, RoPE) and ``post_attention``
(output projection, MLP, residuals); paged attention stays eager between them, so block tables and
context lengths never enter a graph. Both bodies are compiled with dynamic token counts
(``dynamic=True``): one graph per side of the quantised-GEMV row cap (engine/quant.py) plus dynamo's
own 0/1 specialisation, so the set of compiled shapes is small and capped; inductor's on-disk FX graph
cache makes later starts cheap. A compile or run failure logs a warning and falls back to eager for good.

Measured on the 2-core CPU (AMD EPYC) (docs/benchmarks.md, benchmarks/bench_step.py): no faster than eager for
this engine, hence off by default.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

WARMUP_TOKEN_COUNTS = (1, 2, 8, 64)


class _EagerFallback:
    """Call ``compiled``; on its first exception warn once and use ``eager`` from then on."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], label: str) -> None:
        self.compiled, self.eager, self.label = compiled, eager, label
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any inductor / dynamo failure: serve eagerly
                self.failed = True
                logger.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.label,
                               type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return self.eager(*args)


def compile_layers(model: torch.nn.Module) -> list[_EagerFallback]:
    """Replace every decoder layer's ``_pre`` / ``_post`` by compiled versions with eager fallback.
    Returns the wrappers (``failed`` tells whether one fell back). The model's numerics are unchanged
    up to inductor's fp32 reassociation (tests/engine/test_quant.py: fp32 within 1e-5, bf16 within 2 ulps)."""
    wrappers = []
    model.fused_step = False  # the compiled bodies serve every step
    for i, layer in enumerate(model.layers):
        for side, fn in (("_pre", layer.pre_attention), ("_post", layer.post_attention)):
            wrapper = _EagerFallback(torch.compile(fn, dynamic=True), fn, f"layer {i} {side[1:]}")
            setattr(layer, side, wrapper)
            wrappers.append(wrapper)
    return wrappers


def warm_up(step_fn: Callable[[int, int], float], token_counts: Sequence[int] | None = None,
            progress: bool = True) -> float:
    """Run ``step_fn(T, 1)`` (engine.throughput_probe.make_step_fn) once per token count (default
    ``WARMUP_TOKEN_COUNTS``) so compilation happens at start-up, with a progress bar on stderr.
    Returns the seconds spent."""
    import time

    from tqdm import tqdm

    token_counts = WARMUP_TOKEN_COUNTS if token_counts is None else token_counts
    start = time.perf_counter()
    for num_tokens in tqdm(token_counts, desc="compiling step", unit="shape", disable=not progress, file=sys.stderr):
        step_fn(num_tokens, 1)
    return time.perf_counter() - start
