"""Run prompts through an ``EngineCore`` to the end, keeping each request's finish reason (the GPU windows
and the tests that compare attention paths need both; ``EngineCore.generate_batch`` returns tokens only)."""

from __future__ import annotations

from dataclasses import dataclass

from sparkserve.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class RunResult:
    """Per prompt, in order: the generated token ids and the finish reason (``str``; None if unfinished)."""

    tokens: list[list[int]]
    finish_reasons: list[str | None]

    @property
    def num_errors(self) -> int:
        """Requests that finished with ``error`` (a failed step)."""
        return sum("error" in str(r) for r in self.finish_reasons)


def run_to_end(core, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],  # noqa: ANN001
               prefix: str = "run", steps: list | None = None) -> RunResult:
    """Add every prompt at once (``params``: one for all or one per prompt), step until none is unfinished.
    ``steps``, when given, receives each step's stats record (``core.last_step``; None for an empty step)."""
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    for rid, prompt, p in zip(ids, prompts, per_prompt, strict=True):
        core.add_request(core.make_request(rid, prompt, p))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    reasons: dict[str, str] = {}
    while core.has_unfinished_requests():
        outputs = core.step()
        if steps is not None:
            steps.append(core.last_step)
        for out in outputs:
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = str(out.finish_reason)
    return RunResult([tokens[r] for r in ids], [reasons.get(r) for r in ids])
