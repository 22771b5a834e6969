"""What happens when an engine step raises: the requests of the step fail, never the engine.

A step is ``schedule -> runner.execute -> update_from_output``; any of them may raise (a bug, a
request field that slipped through validation, a transient allocation failure). The policy:

* The step's requests are the plan's; when ``schedule()`` itself raised there is no plan, and every
  running request counts (the scheduler was planning for all of them), or only the isolated request
  when it was planning a solo step.
* A request's first failure: it is rolled back (``Scheduler.rollback_request``: blocks freed, outputs
  cut back to what was delivered before the step, runner state dropped, first in the waiting queue) and
  *isolated*: it runs in steps of its own, alternating with normal steps, until it has sampled
  ``scheduler.ISOLATION_SAMPLES`` times, then rejoins normal steps.
* A failure of an isolated request (it failed alone: it is the cause) is its second: it is finished
  with ``finish_reason="error"`` (the server sends an error event, then ``[DONE]``) and not retried.
  Since normal steps hold no isolated request, one poisoned request is found in its own step and cannot
  take the innocent ones with it: they were retried and pass their solo steps.
* Requests that finished inside the failed step get an ``"error"`` output too (the step's outputs
  are lost with it); every runner state that may be stale is dropped at the next step
  (``Scheduler.resync_runner``: the failed plan's finished ids, and every request that will be sent
  to the runner as new), so the persistent batch cannot keep rows of requests it lost track of.
* ``max_consecutive_failures`` failed steps in a row (no successful step between them) mean the
  engine itself is broken: :class:`EngineBrokenError` is raised; the async loop then dies, every
  in-flight request gets ``EngineDeadError`` and the server process exits non-zero (a supervisor
  restarts it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sparkserve.engine.outputs import EngineDeadError
from sparkserve.scheduler.outputs import EngineCoreOutput, SchedulerOutput
from sparkserve.scheduler.request import RequestStatus
from sparkserve.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_FAILURES = 32


class EngineBrokenError(EngineDeadError):
    """Steps keep failing whatever requests they hold: the engine cannot continue."""


class StepFaultHandler:
    """Applies the policy of the module docstring to the scheduler after a failed step.

    Args:
        scheduler: the engine's scheduler (the only writer of request state).
        max_consecutive_failures: failed steps in a row after which the engine is declared broken.
    """

    def __init__(self, scheduler: Scheduler, max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES) -> None:
        if max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures must be >= 1")
        self.scheduler = scheduler
        self.max_consecutive_failures = max_consecutive_failures
        self.num_consecutive_failures = 0
        self.num_failed_steps = 0
        self.num_failed_requests = 0

    def on_success(self, plan: SchedulerOutput) -> None:
        """A step with work completed: the engine works."""
        if plan.seqs:
            self.num_consecutive_failures = 0

    def recover(
        self, exc: Exception, plan: SchedulerOutput | None, num_delivered: Mapping[str, int]
    ) -> list[EngineCoreOutput]:
        """Handle a step that raised ``exc``; returns the outputs to deliver (the "error" ends).

        Args:
            exc: what the step raised.
            plan: the step's plan, or None when ``schedule()`` raised.
            num_delivered: output tokens each planned request had before the step.

        Raises:
            EngineBrokenError: the ``max_consecutive_failures``-th failed step in a row.
        """
        self.num_failed_steps += 1
        self.num_consecutive_failures += 1
        scheduler = self.scheduler
        if plan is None and scheduler.solo_request_id is not None:
            involved = [scheduler.solo_request_id]
        elif plan is None:
            involved = [r.request_id for r in scheduler.running_requests]
        else:
            involved = [seq.request_id for seq in plan.seqs]
        isolated = set(scheduler.isolated_request_ids)
        logger.error("engine step failed (%d requests, %d in a row): %r", len(involved),
                     self.num_consecutive_failures, exc, exc_info=exc)
        if self.num_consecutive_failures >= self.max_consecutive_failures:
            raise EngineBrokenError(
                f"{self.num_consecutive_failures} engine steps failed in a row; last error: {exc!r}"
            ) from exc
        outputs = []
        for request_id in involved:
            request = scheduler.get_request(request_id)
            if request is not None and request_id not in isolated:
                scheduler.rollback_request(request_id, num_delivered.get(request_id, request.num_output_tokens))
                continue
            num_prompt = 0 if request is None else request.num_prompt_tokens
            if request is not None:
                scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
                logger.error("request %s failed twice: finished with an error", request_id)
            self.num_failed_requests += 1
            outputs.append(EngineCoreOutput(request_id, (), finish_reason="error", num_prompt_tokens=num_prompt))
        scheduler.resync_runner(plan.finished_request_ids if plan is not None else frozenset())
        return outputs
