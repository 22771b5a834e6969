"""Reading an engine's per-step stats records in tests: run or step a core and sum its speculation counts."""

from __future__ import annotations

from sparkserve.engine.core import EngineCore
from sparkserve.engine.outputs import StepStats
from sparkserve.scheduler.outputs import EngineCoreOutput
from sparkserve.scheduler.stats import SpecDecodingStats


def spec_totals(core: EngineCore, steps: list[StepStats | None]) -> SpecDecodingStats:
    """The speculation counts of ``steps`` (records of ``core``; None entries: no step ran)."""
    return SpecDecodingStats.merge(core.num_speculative_tokens,
                                   (s.scheduler.spec_decoding for s in steps if s is not None))


def generate_recorded(core: EngineCore, prompts: list[list[int]], params,
                      request_prefix: str = "batch") -> tuple[list[list[int]], SpecDecodingStats]:
    """``core.generate_batch`` and the speculation counts of its steps."""
    steps: list[StepStats] = []
    outputs = core.generate_batch(prompts, params, request_prefix=request_prefix, steps=steps)
    return outputs, spec_totals(core, steps)


def step_recorded(core: EngineCore, steps: list[StepStats | None]) -> list[EngineCoreOutput]:
    """``core.step()``, appending its stats record (None for an empty step) to ``steps``."""
    outputs = core.step()
    steps.append(core.last_step)
    return outputs
