"""KV-cache events from the prefix cache, in vLLM's wire format: the encoding against vLLM's schema
(current tagged maps and the legacy arrays), the engine publishing them per step. The pinned
vllm-router consuming them is tested in tests/server/test_router_kv_aware.py."""

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
    wire_hash,
)
from sparkserve.scheduler.kv_events_replay import END_SEQ

BLOCK_SIZE = 4
# vLLM's event structs (vllm/distributed/kv_events.py): the fields without defaults, in declaration order
# (v0.28: tagged maps with lora_name; the legacy array layout ended at medium).
VLLM_FIELDS = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}
LEGACY_FIELDS = {**VLLM_FIELDS, "BlockStored": VLLM_FIELDS["BlockStored"][:6]}


def run_request(manager: BlockManager, request_id: str, tokens: list[int]) -> list[int]:
    """Prefill ``tokens`` with prefix caching as the scheduler does; returns the key hashes."""
    keys = block_keys(tokens, BLOCK_SIZE)
    manager.allocate_prefix(request_id, manager.cached_prefix(keys, len(keys)))
    assert manager.allocate(request_id, len(tokens))
    manager.cache_blocks(request_id, keys)
    return [wire_hash(k.hash) for k in keys]


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
    """Current layout: ``[ts, [{"type": tag, field: value, ...}, ...]]``; every field present."""
    events = [BlockStored([11, 12], None, list(range(8)), 4), BlockRemoved([11]), AllBlocksCleared()]
    ts, decoded = msgpack.unpackb(encode_event_batch(events, ts=12.5))
    assert ts == 12.5
    assert [e["type"] for e in decoded] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    for event, raw in zip(events, decoded, strict=True):
        assert set(raw) == {"type", *VLLM_FIELDS[raw["type"]]}
        assert {name: raw[name] for name in VLLM_FIELDS[raw["type"]]} == {
            name: getattr(event, name) for name in VLLM_FIELDS[raw["type"]]}
    assert msgpack.unpackb(encode_event_batch(events[:1], ts=1.0, data_parallel_rank=3))[2] == 3


def test_legacy_array_encoding() -> None:
    events = [BlockStored([11, 12], None, list(range(8)), 4), BlockRemoved([11]), AllBlocksCleared()]
    _, decoded = msgpack.unpackb(encode_event_batch(events, ts=1.0, array_like=True))
    assert [e[0] for e in decoded] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    for event, raw in zip(events, decoded, strict=True):
        named = dict(zip(LEGACY_FIELDS[raw[0]], raw[1:], strict=True))
        assert named == {name: getattr(event, name) for name in LEGACY_FIELDS[raw[0]]}


def test_hashes_on_the_wire_are_unsigned_64_bit() -> None:
    """vllm-router rejects a negative integer hash; Python's tuple hashes are often negative."""
    recorder = KVEventRecorder()
    manager = BlockManager(64, BLOCK_SIZE, enable_caching=True, listener=recorder)
    for i in range(8):
        run_request(manager, f"r{i}", [i] * 8)  # two blocks, no parent
        run_request(manager, f"r{i}b", [i] * 8 + [99] * 4)  # one more block, its parent the second
    stored = [e for e in recorder.drain() if isinstance(e, BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes] + [e.parent_block_hash for e in stored if e.parent_block_hash]
    assert len(hashes) == 8 * 4 and all(0 <= h < 2**64 for h in hashes)
    assert msgpack.unpackb(encode_event_batch(stored))[1][0]["block_hashes"] == stored[0].block_hashes


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
        assert msgpack.unpackb(payload)[1] == [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                                                "token_ids": [5, 6, 7, 8], "block_size": 4, "lora_id": None,
                                                "medium": "CPU", "lora_name": None}]
        publisher.publish([event])
        assert subscriber.poll(2000)
        assert int.from_bytes(subscriber.recv_multipart()[1], "big") == int.from_bytes(seq, "big") + 1
    finally:
        subscriber.close(linger=0)
        publisher.close()


def test_replay_serves_missed_batches_then_the_end_marker() -> None:
    """A subscriber that missed batches asks the replay socket from a sequence number on (vLLM's protocol:
    ``[b"", start_seq]``; replies ``[b"", seq, payload]`` ... then ``END_SEQ``)."""
    publisher = ZmqKVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3)
    replay_endpoint = publisher._replay._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.connect(replay_endpoint)
    try:
        for i in range(5):  # nobody subscribed: every batch is lost on the PUB side
            publisher.publish([BlockStored([i], None, [i] * 4, 4)])
        client.send_multipart([b"", (3).to_bytes(8, "big")])
        replies = []
        while True:
            assert client.poll(5000)
            _, seq, payload = client.recv_multipart()
            if seq == END_SEQ:
                break
            replies.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)[1][0]["block_hashes"]))
        assert replies == [(3, [3]), (4, [4])]
        client.send_multipart([b"", (0).to_bytes(8, "big")])  # only the last 3 batches are kept
        seqs = []
        while (frames := client.recv_multipart() if client.poll(5000) else None) and frames[1] != END_SEQ:
            seqs.append(int.from_bytes(frames[1], "big"))
        assert frames is not None and seqs == [2, 3, 4]
    finally:
        client.close(linger=0)
        publisher.close()
