"""Rank 0's side of tensor parallelism: spawn the workers, join the group, and run each step everywhere.

``start_tensor_parallel`` spawns ranks 1 .. tp - 1 (``engine/parallel/worker.py``), joins the group as rank
0 and returns a :class:`TensorParallelRunner`: the engine's runner, which broadcasts each plan and then
executes it on rank 0's own shard (and at start-up each synthetic step of the throughput probe, so the
profile is measured with every rank stepping). A monitor thread watches the workers: one that exits while serving
(killed, crashed, or parted from rank 0) is logged with its rank and exit status, the others are killed
and the server process exits with status 1 at once (rank 0 may be blocked inside a collective that will
never complete, so no clean unwinding is attempted). ``close`` stops the workers and leaves the group.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import torch

from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.model_runner import ModelRunner
from sparkserve.engine.parallel.group import (
    TensorParallelGroup,
    check_tensor_parallel_size,
    destroy_group,
    init_group,
)
from sparkserve.engine.parallel.rank_runner import ModelBuild, RunnerSettings, build_rank_runner
from sparkserve.engine.parallel.worker import (
    WORKER_FAILED_EXIT_CODE,
    ProbeMessage,
    StepMessage,
    WorkerSpec,
    rank_device,
    run_probe,
    worker_main,
)
from sparkserve.engine.sampling.mask import LogitsMask
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.engine.spec_decode.speculator import Speculator
from sparkserve.engine.step_faults import EngineBrokenError
from sparkserve.engine.step_graph import StepGraph
from sparkserve.engine.throughput_probe import ProbeTimers
from sparkserve.scheduler.outputs import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

# Exit status of the server after a worker died (the server's "engine died" status).
WORKER_DIED_EXIT_CODE = 1
_JOIN_TIMEOUT_S = 10.0


def death_reason(exitcode: int | None) -> str:
    """Why a worker with this exit status ended, in words (its own message, if any, is in the log above)."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    if exitcode == WORKER_FAILED_EXIT_CODE:
        return "its step failed or its tokens parted from rank 0's"
    return "exited on its own"


def _die(rank: int, exitcode: int | None) -> None:
    logger.critical("tensor-parallel worker rank %d exited with status %s (%s) while serving: stopping the server "
                    "(exit status %d)", rank, exitcode, death_reason(exitcode), WORKER_DIED_EXIT_CODE)
    logging.shutdown()
    os._exit(WORKER_DIED_EXIT_CODE)


class WorkerPool:
    """The spawned worker processes and the thread that watches them.

    Args:
        spec: what each worker builds.
        on_death: called with (rank, exit status) when a worker exits before :meth:`close`; the default
            logs and exits the process with status 1 (after killing the other workers).
    """

    def __init__(self, spec: WorkerSpec, on_death: Callable[[int, int | None], None] = _die) -> None:
        context = multiprocessing.get_context("spawn")
        self._closing = False
        self._on_death = on_death
        self.processes = [context.Process(target=worker_main, args=(rank, spec), name=f"tp-rank{rank}", daemon=True)
                          for rank in range(1, spec.world_size)]
        for p in self.processes:
            p.start()
        self._monitor = threading.Thread(target=self._watch, name="tp-monitor", daemon=True)
        self._monitor.start()

    @property
    def all_alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def _watch(self) -> None:
        pending = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending)):
                rank = pending.pop(sentinel)
                if self._closing:
                    continue
                process = self.processes[rank - 1]
                process.join(_JOIN_TIMEOUT_S)  # the sentinel can fire before the exit status is there
                exitcode = process.exitcode
                self.kill()
                self._on_death(rank, exitcode)

    def kill(self) -> None:
        """SIGKILL every live worker and reap it."""
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(_JOIN_TIMEOUT_S)

    def close(self, stopped: bool) -> None:
        """Reap the workers (``stopped``: they were sent the stop message); kill those still running."""
        self._closing = True
        for p in self.processes:
            p.join(_JOIN_TIMEOUT_S if stopped else 0)
        self.kill()


class TensorParallelRunner:
    """The engine's runner under tensor parallelism: broadcasts each plan, then runs it on rank 0's shard.

    A step that raises leaves the ranks at different points of the step, so it breaks the engine
    (``EngineBrokenError``) instead of being retried.
    """

    compiled = False

    def __init__(self, local: ModelRunner, tp: TensorParallelGroup, pool: WorkerPool) -> None:
        self.local = local
        self.tp = tp
        self.pool = pool
        self._previous: dict[str, list[int]] = {}
        self._broken = False
        self._closed = False

    @property
    def speculator(self) -> Speculator | None:
        return self.local.speculator

    @property
    def graphs(self) -> StepGraph | None:
        return self.local.graphs

    def probe_timers(self, num_blocks: int) -> ProbeTimers:
        """The start-up throughput probe's timers (``engine/throughput_probe.py``), run by every rank together:
        each call broadcasts a :class:`ProbeMessage`, then runs the timer on rank 0's shard. The seconds are
        rank 0's wall time from the broadcast to the end of its part, as for a served step (collectives wait
        for the slowest rank)."""

        def step(num_tokens: int, num_requests: int) -> float:
            return self._probe(ProbeMessage("step", num_blocks, (num_tokens, num_requests)))

        def draft(num_requests: int, sampled: bool = False) -> float:
            return self._probe(ProbeMessage("draft", num_blocks, (num_requests, int(sampled))))

        return ProbeTimers(step, draft if self.local.speculator is not None else None)

    def _probe(self, message: ProbeMessage) -> float:
        if self._broken or self._closed:
            raise EngineBrokenError("the tensor-parallel group is out of step after a failed step")
        start = time.perf_counter()
        try:
            self.tp.broadcast_object(message)
            run_probe(self.local, message)
        except Exception as exc:
            self._broken = True
            raise EngineBrokenError(f"tensor-parallel probe step failed on rank 0: {exc!r}") from exc
        return time.perf_counter() - start

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Broadcast ``out`` with rank 0's previous tokens, then execute it here (``ModelRunner.execute``)."""
        if self._broken or self._closed:
            raise EngineBrokenError("the tensor-parallel group is out of step after a failed step")
        try:
            self.tp.broadcast_object(StepMessage(out, self._previous))
            result = self.local.execute(out)
        except Exception as exc:
            self._broken = True
            raise EngineBrokenError(f"tensor-parallel step failed on rank 0: {exc!r}") from exc
        self._previous = {rid: list(tokens) for rid, tokens in result.sampled_token_ids.items()}
        return result

    def close(self) -> None:
        """Stop the workers (a stop message when the group is healthy) and leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stopped = False
        if not self._broken and self.pool.all_alive:
            try:
                self.tp.broadcast_object(None)
                stopped = True
            except Exception:  # noqa: BLE001 - a worker died meanwhile: kill the rest below
                logger.exception("stopping the tensor-parallel workers failed")
        self.pool.close(stopped)
        destroy_group()
        logger.info("tensor-parallel workers stopped (exit statuses %s)",
                    [p.exitcode for p in self.pool.processes])


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_tensor_parallel(world_size: int, loaded: LoadedModel, drafter: Drafter | None, build: ModelBuild,
                          settings: RunnerSettings, device: torch.device, mask: LogitsMask | None,
                          num_threads: int | None = None,
                          on_death: Callable[[int, int | None], None] = _die) -> TensorParallelRunner:
    """Spawn ``world_size - 1`` workers (each calls ``build()``, which must give what rank 0 holds: ``loaded``
    and ``drafter``), shard ``loaded`` for rank 0 and join the group.

    ``num_threads``: torch threads of every rank (default: this process's count divided by ``world_size``,
    at least 1; rank 0's count is set too).

    Raises:
        ValueError: the model's heads do not divide by ``world_size`` (checked before anything is spawned)
            or it is quantised.
    """
    check_tensor_parallel_size(loaded.config, world_size)
    threads = num_threads or max(1, torch.get_num_threads() // world_size)
    torch.set_num_threads(threads)
    spec = WorkerSpec(build, settings, world_size, free_port(), device.type, threads)
    pool = WorkerPool(spec, on_death)
    try:
        tp = init_group(0, world_size, spec.port, rank_device(device.type, 0))
        local = build_rank_runner(tp, loaded, drafter, settings, rank_device(device.type, 0), mask)
    except BaseException:
        pool.close(stopped=False)
        destroy_group()
        raise
    logger.info("tensor parallel: %d ranks (%s), %d threads each", world_size,
                "nccl" if device.type == "cuda" else "gloo", threads)
    return TensorParallelRunner(local, tp, pool)
