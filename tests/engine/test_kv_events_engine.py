"""The engine publishes its prefix cache's KV events (``EngineArgs.kv_events_endpoint``), one batch per step,
on the real SmolLM2-135M: what a prompt's prefill stores arrives on a ZMQ subscriber with the prompt's
tokens, block by block; the same prompt again stores nothing new."""

from __future__ import annotations

import msgpack
import zmq

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.server_harness import free_port

BLOCK_SIZE = 16


def received(subscriber: zmq.Socket, timeout_ms: int) -> list[dict]:
    """Every event of the batches that arrive within ``timeout_ms`` of each other."""
    events: list[dict] = []
    while subscriber.poll(timeout_ms):
        _topic, _seq, payload = subscriber.recv_multipart()
        events += msgpack.unpackb(payload)[1]
    return events


def test_engine_publishes_the_blocks_a_prompt_stores(smollm2) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = EngineArgs(dtype="float32", drafter="none", num_kv_blocks=64, block_size=BLOCK_SIZE,
                      kv_events_endpoint=endpoint, kv_events_topic="kv")
    core = EngineCore(args, loaded=smollm2)
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.connect(endpoint)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"kv")
    params = SamplingParams(temperature=0.0, max_tokens=1)
    try:
        # A SUB socket joins asynchronously: run distinct prompts until a batch gets through.
        for i in range(50):
            core.generate_batch([[100 + i] * BLOCK_SIZE], params, request_prefix=f"join{i}")
            if received(subscriber, 200):
                break
        else:
            raise AssertionError("no KV event batch reached the subscriber")
        prompt = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 5)  # > 3 blocks
        full = len(prompt) // BLOCK_SIZE * BLOCK_SIZE
        core.generate_batch([prompt], params, request_prefix="p")
        stored = [e for e in received(subscriber, 500) if e["type"] == "BlockStored"]
        assert [t for e in stored for t in e["token_ids"]] == prompt[:full]
        assert all(e["block_size"] == BLOCK_SIZE for e in stored)
        assert stored[0]["parent_block_hash"] is None
        hashes = [h for e in stored for h in e["block_hashes"]]
        assert len(hashes) == full // BLOCK_SIZE and all(0 <= h < 2**64 for h in hashes)
        core.generate_batch([prompt], params, request_prefix="again")  # all cached: nothing new stored
        assert [e for e in received(subscriber, 500) if e["type"] == "BlockStored"] == []
    finally:
        subscriber.close(linger=0)
        core.kv_events.close()
