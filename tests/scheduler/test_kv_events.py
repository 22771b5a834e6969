"""KV-cache events from the prefix cache, in vLLM's wire format (tested against vLLM's documented
schema: the pinned vllm-router is not fed these events in a test; see docs/scale_out.md)."""

from __future__ import annotations

import msgpack
import zmq

from sparkserve.scheduler.block_manager import BlockManager, block_keys
from sparkserve.scheduler.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventRecorder,
    ZmqKVEventPublisher,
    encode_event_batch,
)

BLOCK_SIZE = 4
# vLLM's event structs (vllm/distributed/kv_events.py): field names in declaration order.
VLLM_FIELDS = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}


def run_request(manager: BlockManager, request_id: str, tokens: list[int]) -> list[int]:
    """Prefill ``tokens`` with prefix caching as the scheduler does; returns the key hashes."""
    keys = block_keys(tokens, BLOCK_SIZE)
    manager.allocate_prefix(request_id, manager.cached_prefix(keys, len(keys)))
    assert manager.allocate(request_id, len(tokens))
    manager.cache_blocks(request_id, keys)
    return [k.hash for k in keys]


def test_cached_blocks_are_reported_with_their_tokens() -> None:
    recorder = KVEventRecorder()
    manager = BlockManager(8, BLOCK_SIZE, enable_caching=True, listener=recorder)
    first = list(range(100, 114))  # 3 full blocks + 2 tokens
    hashes = run_request(manager, "a", first)
    assert recorder.drain() == [BlockStored(hashes, None, first[:12], BLOCK_SIZE)]
    # Same first two blocks, then other tokens: only the third block is new; its parent is block 2.
    second = first[:8] + [7, 7, 7, 7]
    second_hashes = run_request(manager, "b", second)
    assert second_hashes[:2] == hashes[:2]
    assert recorder.drain() == [BlockStored(second_hashes[2:], hashes[1], [7, 7, 7, 7], BLOCK_SIZE)]
    run_request(manager, "b2", second)  # everything cached already: nothing new
    assert recorder.drain() == []


def test_evicted_blocks_are_reported_removed() -> None:
    recorder = KVEventRecorder()
    manager = BlockManager(4, BLOCK_SIZE, enable_caching=True, listener=recorder)
    stored = run_request(manager, "a", list(range(16)))  # all 4 blocks cached
    manager.free("a")
    recorder.drain()
    assert manager.allocate("b", 2 * BLOCK_SIZE)  # needs 2 fresh blocks: the 2 least recently used go
    removed = [h for e in recorder.drain() for h in e.block_hashes]
    assert len(removed) == 2 and set(removed) <= set(stored)
    assert manager.num_cached_blocks == 2  # what the events say is left


def test_no_listener_no_events_and_same_cache() -> None:
    with_listener = BlockManager(8, BLOCK_SIZE, enable_caching=True, listener=KVEventRecorder())
    without = BlockManager(8, BLOCK_SIZE, enable_caching=True)
    for manager in (with_listener, without):
        run_request(manager, "a", list(range(12)))
        manager.check_integrity()
    assert with_listener.num_cached_blocks == without.num_cached_blocks == 3


def test_batch_encoding_follows_vllm_schema() -> None:
    events = [BlockStored([11, 12], None, list(range(8)), 4), BlockRemoved([11]), AllBlocksCleared()]
    ts, decoded = msgpack.unpackb(encode_event_batch(events, ts=12.5))
    assert ts == 12.5
    assert [e[0] for e in decoded] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    for event, raw in zip(events, decoded, strict=True):
        named = dict(zip(VLLM_FIELDS[raw[0]], raw[1:], strict=True))
        assert named == {name: getattr(event, name) for name in VLLM_FIELDS[raw[0]]}
    assert msgpack.unpackb(encode_event_batch(events[:1], ts=1.0, data_parallel_rank=3))[2] == 3


def test_zmq_publisher_sends_topic_sequence_payload() -> None:
    publisher = ZmqKVEventPublisher("tcp://127.0.0.1:*", topic="kv")
    endpoint = publisher._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.connect(endpoint)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"kv")
    try:
        event = BlockStored([1], None, [5, 6, 7, 8], 4)
        frames = None
        for _ in range(50):  # a SUB socket joins asynchronously: publish until one batch arrives
            publisher.publish([event])
            if subscriber.poll(100):
                frames = subscriber.recv_multipart()
                break
        assert frames is not None
        topic, seq, payload = frames
        assert topic == b"kv" and len(seq) == 8
        assert msgpack.unpackb(payload)[1] == [["BlockStored", [1], None, [5, 6, 7, 8], 4, None, "CPU"]]
        publisher.publish([event])
        assert subscriber.poll(2000)
        assert int.from_bytes(subscriber.recv_multipart()[1], "big") == int.from_bytes(seq, "big") + 1
    finally:
        subscriber.close(linger=0)
        publisher.close()
