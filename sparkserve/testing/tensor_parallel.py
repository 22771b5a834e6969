"""Tensor-parallel test helpers: picklable model builds (every rank calls the same function and gets the
same weights: ``EngineCore(build=functools.partial(tiny_build, ...))``), a forced divergence, and the
server's worker processes as seen from /proc."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.parallel.worker import WorkerSpec, worker_main
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.testing.tiny import random_dspark, tiny_target


def tiny_build(speculate: bool, seed: int = 0) -> tuple[LoadedModel, Drafter | None]:
    """The tiny random fp32 target (4 query heads, 2 KV heads, vocab 61: divides by 2, not by 3) and, when
    ``speculate``, a random DSpark drafter (block 4) on its heads."""
    target = tiny_target(seed=seed)
    return target, random_dspark(target, block_size=4, seed=seed + 1) if speculate else None


def reseeded_worker_main(rank: int, spec: WorkerSpec) -> None:
    """``worker_main`` with another engine seed: the worker samples unseeded requests from other random
    streams than rank 0, so its tokens part from rank 0's (a forced divergence; greedy and seeded requests
    are unaffected)."""
    settings = dataclasses.replace(spec.settings, engine_seed=spec.settings.engine_seed + 1)
    worker_main(rank, dataclasses.replace(spec, settings=settings))


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker_pids(pid: int) -> list[int]:
    """The server ``pid``'s tensor-parallel workers (spawned children, not multiprocessing's resource
    tracker), sorted by pid (rank order: they are spawned in rank order)."""
    result = []
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            result.append(child)
    return sorted(result)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
