"""A tensor-parallel worker process (ranks 1 .. tp - 1): a loop around its own ``ModelRunner``.

Rank 0 (the server) decides each step: it broadcasts a :class:`StepMessage` holding the scheduler's plan,
which fixes every rank's batch, verify budget and drafts to verify (``ScheduledSeq.spec_token_ids``), so no
rank can pick another budget and hang the collectives (the failure of vllm-project/vllm#56831). The worker
executes the same plan on its shard; its logits are the gathered full-vocab logits, so its sampled tokens
and drafts are rank 0's. It checks that against rank 0's previous output (carried in the message) and
exits non-zero on any difference or error; rank 0's monitor then stops the server.

At start-up rank 0 may measure its throughput profile (``engine/throughput_probe.py``): each synthetic step
of the probe is broadcast as a :class:`ProbeMessage` and run here too, so the sharded forward's collectives
meet on every rank (rank 0 alone would wait in its first all-reduce until the group's timeout).

A worker never outlives the server: it ignores SIGINT (Ctrl-C reaches the whole process group; the
server decides) and exits when its parent process is gone (even after SIGKILL).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Literal

import torch

from sparkserve.engine.model_runner import ModelRunner
from sparkserve.engine.parallel.group import destroy_group, init_group
from sparkserve.engine.parallel.rank_runner import ModelBuild, RunnerSettings, build_rank_runner
from sparkserve.engine.structured.logits_mask import GrammarLogitsMask
from sparkserve.engine.throughput_probe import make_draft_fn, make_step_fn
from sparkserve.scheduler.outputs import SchedulerOutput

logger = logging.getLogger(__name__)

# Exit status of a worker whose ranks parted (its tokens differ from rank 0's) or whose step raised.
WORKER_FAILED_EXIT_CODE = 3


@dataclass(frozen=True)
class StepMessage:
    """One step, broadcast by rank 0.

    Attributes:
        plan: the scheduler's plan every rank executes.
        previous_tokens: rank 0's ``RunnerOutput.sampled_token_ids`` of the previous step (the check).
    """

    plan: SchedulerOutput
    previous_tokens: dict[str, list[int]]


@dataclass(frozen=True)
class ProbeMessage:
    """One synthetic step of the start-up throughput probe, broadcast by rank 0
    (``TensorParallelRunner.probe_timers``).

    Attributes:
        timer: "step" (``make_step_fn``: target forward, logits, drafter forward) or "draft" (``make_draft_fn``:
            the drafter forward alone).
        num_blocks: the KV pool the synthetic block tables wrap around (rank 0's ``num_blocks``).
        args: the timer's arguments: (B tokens, R requests) for "step", (R requests, sampled) for "draft".
    """

    timer: Literal["step", "draft"]
    num_blocks: int
    args: tuple[int, int]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a spawned worker needs (pickled to it).

    Attributes:
        build: returns the full model and drafter, the same as rank 0's.
        settings: the runner's arguments.
        world_size: tp.
        port: the TCP port of the group's rendezvous on 127.0.0.1.
        device: "cpu", or "cuda" (rank r uses cuda:r).
        num_threads: torch intra-op threads (the same on every rank: identical replicated arithmetic).
    """

    build: ModelBuild
    settings: RunnerSettings
    world_size: int
    port: int
    device: str
    num_threads: int


class RanksDivergedError(RuntimeError):
    """A worker's tokens differ from rank 0's: its KV cache no longer matches the served sequence."""


def rank_device(device: str, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU, or CUDA device ``rank``."""
    return torch.device(f"cuda:{rank}") if device.startswith("cuda") else torch.device("cpu")


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Process entry point (``multiprocessing`` spawn target). Exits 0 after rank 0's stop message,
    ``WORKER_FAILED_EXIT_CODE`` on any error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    try:
        _serve(rank, spec)
    except Exception:  # noqa: BLE001 - reported to rank 0 through the exit status
        traceback.print_exc()
        print(f"tensor-parallel worker rank {rank} failed (see the traceback above)", file=sys.stderr, flush=True)
        os._exit(WORKER_FAILED_EXIT_CODE)  # skip the group's teardown: its peers may be gone


def _serve(rank: int, spec: WorkerSpec) -> None:
    torch.set_num_threads(spec.num_threads)
    device = rank_device(spec.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # "cuda" in the build means this rank's device
    loaded, drafter = spec.build()
    tp = init_group(rank, spec.world_size, spec.port, device)
    tokenizer = loaded.tokenizer
    mask = GrammarLogitsMask(lambda: tokenizer.grammar_compiler, loaded.config.vocab_size)
    runner = build_rank_runner(tp, loaded, drafter, spec.settings, device, mask)
    del loaded  # the full weights: only the shard stays
    mine: dict[str, list[int]] = {}
    step = 0
    while True:
        message = tp.broadcast_object(None)
        if message is None:
            break
        if isinstance(message, ProbeMessage):
            run_probe(runner, message)
            continue
        assert isinstance(message, StepMessage)
        if message.previous_tokens != mine:
            raise RanksDivergedError(f"rank {rank} parted from rank 0 at step {step}: rank 0 sampled "
                                     f"{message.previous_tokens}, this rank {mine}")
        mine = dict(runner.execute(message.plan).sampled_token_ids)
        step += 1
    destroy_group()


def run_probe(runner: ModelRunner, message: ProbeMessage) -> float:
    """Run one probe timer on this rank's runner; returns its seconds (rank 0's are the profile's).

    Raises:
        ValueError: an unknown timer, or "draft" without a drafter.
    """
    if message.timer == "step":
        return make_step_fn(runner, message.num_blocks)(*message.args)
    if message.timer == "draft":
        num_requests, sampled = message.args
        return make_draft_fn(runner, message.num_blocks)(num_requests, bool(sampled))
    raise ValueError(f"unknown probe timer {message.timer!r}")


def _exit_with_parent() -> None:
    """Exit at once when the parent (the server) dies, however it died."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
