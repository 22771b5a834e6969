"""A live server on the real SmolLM2 with speculation on (the shipped drafter), shared by the client
tests of this folder (one engine start for all of them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sparkserve.engine.async_engine import AsyncEngine
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.profile import ThroughputProfile
from sparkserve.testing.server_harness import RunningServer, run_server

PROFILE = Path(__file__).resolve().parents[1] / "data" / "profile_small.json"


@pytest.fixture(scope="session")
def smol_server(smollm2) -> Iterator[RunningServer]:
    """``served_model_name="smol"``; fp32, 256 KV blocks of 16, 512-token steps, 4 sequences."""
    args = EngineArgs(dtype="float32", num_kv_blocks=256, block_size=16, max_num_batched_tokens=512, max_num_seqs=4)
    engine = AsyncEngine(EngineCore(args, loaded=smollm2, profile=ThroughputProfile.load(PROFILE)))
    with run_server(engine, served_model_name="smol") as running:
        yield running
