"""The engine does all its torch work on one thread: core construction (model load, profile, warm-up),
every step, add and abort (engine/async_engine.py: two OpenMP teams on 2 cores made a c=1 step 2.8x slower)."""

from __future__ import annotations

import asyncio
import threading

import sparkserve.engine.async_engine as async_engine
from sparkserve.engine.config import EngineArgs
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.tiny import tiny_target


def test_core_is_built_and_driven_on_the_engine_thread(monkeypatch) -> None:
    seen: dict[str, set[int]] = {"init": set(), "add": set(), "step": set(), "abort": set()}
    real_core = async_engine.EngineCore
    loaded = tiny_target()

    class RecordingCore(real_core):
        def __init__(self, args: EngineArgs) -> None:
            seen["init"].add(threading.get_ident())
            super().__init__(args, loaded=loaded)

        def add_request(self, request) -> None:
            seen["add"].add(threading.get_ident())
            super().add_request(request)

        def abort_request(self, request_id: str) -> None:
            seen["abort"].add(threading.get_ident())
            super().abort_request(request_id)

        def step(self):
            seen["step"].add(threading.get_ident())
            return super().step()

    monkeypatch.setattr(async_engine, "EngineCore", RecordingCore)
    args = EngineArgs(drafter="none", dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4)

    async def main() -> None:
        engine = async_engine.AsyncEngine.from_args(args)
        await engine.start()
        try:
            out = await engine.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            assert out.num_output_tokens == 4
            stream = await engine.add_request("a", [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=50,
                                                                             ignore_eos=True))
            async for _ in stream:
                await engine.abort("a")
                break
            await asyncio.sleep(0.2)
        finally:
            await engine.shutdown()

    asyncio.run(main())
    main_thread = threading.get_ident()
    threads = set().union(*seen.values())
    assert all(seen.values()), seen  # every kind of call happened
    assert len(threads) == 1 and main_thread not in threads, seen
