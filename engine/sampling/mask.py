"""The logits-mask hook: constrained decoding (grammars) plugs in here.

A mask restricts which tokens may follow a request's output. The verifier applies it to the target's
logits at every verified position (after the request's outputs and the drafts before that position) and
the drafters apply it to q slot by slot, so drafts never contain a forbidden token and acceptance stays
lossless with respect to the constrained target distribution. Masking both p and q keeps rejection
sampling exact; cutting a sampled draft and drawing the cut position from p would not be
(p = (.8, .2, 0), q = (.1, .3, .6) emits (.68, .32)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from sparkserve.scheduler.sampling_params import SamplingParams


@runtime_checkable
class LogitsMask(Protocol):
    """Engine-wide hook; it decides per request whether it constrains it."""

    def constrained(self, request_id: str) -> bool:
        """True when ``request_id``'s tokens are constrained (cheap: called per row and step)."""
        ...

    def allowed(self, request_id: str, output_token_ids: Sequence[int], prefix: Sequence[int]) -> Tensor:
        """``[V]`` bool: tokens allowed after the request's outputs followed by ``prefix`` (drafts)."""
        ...

    def release(self, request_id: str) -> None:
        """The request finished, was aborted or preempted: drop any state kept for it."""
        ...


@runtime_checkable
class RequestLogitsMask(LogitsMask, Protocol):
    """A mask that learns its requests from their sampling parameters (e.g. ``SamplingParams.grammar``)."""

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        """The runner (re)created ``request_id``'s state (new, or resumed after preemption)."""
        ...
