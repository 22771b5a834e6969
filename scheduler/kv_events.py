"""KV-cache events in vLLM's wire format, fed by the prefix cache (``BlockManager(listener=...)``).

vLLM publishes what each engine's prefix cache holds so a KV-aware router can route by it
(``vllm/distributed/kv_events.py``; its example subscriber ``examples/online_serving/kv_events_subscriber.py``):

* ``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium)``: full blocks
  newly cached, in order; ``token_ids`` are their tokens concatenated (``block_size`` per block),
  ``parent_block_hash`` the hash of the block before the first one (None at the start of a prompt);
* ``BlockRemoved(block_hashes, medium)``: blocks evicted;
* ``AllBlocksCleared()``.

On the wire (msgspec): an ``EventBatch`` is the msgpack array ``[ts, [event, ...]]`` (``data_parallel_rank``
appended when set). Each event is, in vLLM's current layout (``KVCacheEvent(tag=True)``, vLLM 0.28), a map
tagged by ``"type"``: ``{"type": "BlockStored", "block_hashes": ..., "parent_block_hash": ..., "token_ids":
..., "block_size": ..., "lora_id": ..., "medium": ..., "lora_name": ...}``; the legacy layout
(``array_like=True``, vLLM before the change) is the array ``["BlockStored", block_hashes, ...]`` in field
order. vllm-router 0.1.17 decodes only the map layout (a legacy array is dropped with "KV event must be a
tagged map"; docs/scale_out.md). The ZMQ publisher sends each batch as the multipart message
``[topic, sequence number (8 bytes, big-endian), payload]`` on a PUB socket.

Block hashes are this cache's chained keys (``BlockKey.hash``) reduced to unsigned 64 bits (the router
rejects a negative integer hash): they identify blocks consistently within one replica's stream (stored,
then parent of the next, then removed), which is all a consumer keys on; vllm-router hashes the
``token_ids`` of each block itself, so the hash scheme need not match vLLM's.

``sparkserve serve --kv-events-endpoint tcp://*:5557`` publishes them (:class:`KVEventPublisher`, flushed
once per engine step; docs/scale_out.md). Nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field
from typing import Protocol

from sparkserve.scheduler.block_manager import BlockKey
from sparkserve.scheduler.kv_events_replay import KVEventReplay

MEDIUM = "CPU"
"""vLLM's ``medium`` names where the blocks live ("GPU", "CPU" ...); this engine's KV lives in host memory
on the CPU (a CUDA deployment would report "GPU")."""

_U64 = (1 << 64) - 1


def wire_hash(key_hash: int) -> int:
    """A block key's hash as an unsigned 64-bit integer (Python's ``hash`` may be negative)."""
    return key_hash & _U64


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM
    lora_name: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = MEDIUM


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVCacheEventListener(Protocol):
    """What ``BlockManager`` calls when its prefix cache changes."""

    def on_blocks_stored(self, keys: Sequence[BlockKey], block_size: int) -> None:
        """``keys``: consecutive full blocks newly cached (``keys[i].parent_hash`` is ``keys[i-1].hash``)."""

    def on_blocks_removed(self, hashes: Sequence[int]) -> None:
        """``hashes``: keys of blocks evicted from the cache."""


@dataclass
class KVEventRecorder:
    """A listener that turns cache changes into vLLM events and keeps them until :meth:`drain`."""

    events: list[KVCacheEvent] = field(default_factory=list)

    def on_blocks_stored(self, keys: Sequence[BlockKey], block_size: int) -> None:
        tokens = [t for key in keys for t in key.token_ids]
        parent = keys[0].parent_hash
        self.events.append(BlockStored([wire_hash(k.hash) for k in keys],
                                       None if parent is None else wire_hash(parent), tokens, block_size))

    def on_blocks_removed(self, hashes: Sequence[int]) -> None:
        self.events.append(BlockRemoved([wire_hash(h) for h in hashes]))

    def drain(self) -> list[KVCacheEvent]:
        out, self.events = self.events, []
        return out


def encode_event(event: KVCacheEvent, array_like: bool = False) -> object:
    """One event as msgpack-ready data: a map tagged by ``"type"`` (vLLM's current layout), or with
    ``array_like`` the legacy array ``[tag, field, ...]`` (module docstring)."""
    if array_like:
        legacy = astuple(event)[:6] if isinstance(event, BlockStored) else astuple(event)  # no lora_name then
        return [type(event).__name__, *legacy]
    return {"type": type(event).__name__, **asdict(event)}


def encode_event_batch(events: Sequence[KVCacheEvent], ts: float | None = None,
                       data_parallel_rank: int | None = None, array_like: bool = False) -> bytes:
    """msgpack bytes of one ``EventBatch`` (module docstring); ``ts`` in seconds since the epoch.

    Needs ``msgpack`` (installed with pyzmq's users such as the ``test`` extra; not a core dependency)."""
    import msgpack
    batch: list[object] = [time.time() if ts is None else ts, [encode_event(e, array_like) for e in events]]
    if data_parallel_rank is not None:
        batch.append(data_parallel_rank)
    return msgpack.packb(batch)


class ZmqKVEventPublisher:
    """Publishes event batches on a ZMQ PUB socket bound to ``endpoint`` (e.g. ``tcp://*:5557``, vLLM's
    default), as ``[topic, seq, payload]`` with ``seq`` counting batches from 0.

    A PUB socket drops what it sends before a subscriber has connected (ZMQ's slow-joiner rule); a
    consumer that starts later sees the blocks stored from then on, and with ``replay_endpoint`` can ask
    for the last ``buffer_steps`` batches (scheduler/kv_events_replay.py).

    Raises:
        zmq.ZMQError: when an endpoint cannot be bound (e.g. the port is taken).
    """

    def __init__(self, endpoint: str, topic: str = "", array_like: bool = False, replay_endpoint: str | None = None,
                 buffer_steps: int = 10_000) -> None:
        import zmq  # pyzmq: only when publishing

        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)  # exit never waits on unsent events
        self._socket.bind(endpoint)
        self._topic = topic.encode()
        self._array_like = array_like
        self._seq = 0
        self._replay = KVEventReplay(replay_endpoint, buffer_steps) if replay_endpoint else None

    def publish(self, events: Sequence[KVCacheEvent]) -> None:
        if not events:
            return
        payload = encode_event_batch(events, array_like=self._array_like)
        self._socket.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload])
        if self._replay is not None:
            self._replay.record(self._seq, payload)
        self._seq += 1

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._replay is not None:
            self._replay.close()


class KVEventPublisher:
    """The engine's KV-event sink: records cache changes as the scheduler makes them (``listener`` goes to
    ``BlockManager``) and publishes them as one batch per engine step (:meth:`flush`), on the engine's
    own thread (a ZMQ socket must stay on one thread).

    Args:
        endpoint: ZMQ endpoint to bind, e.g. ``tcp://*:5557``.
        topic: first frame of every message (vLLM's ``--kv-events-config`` ``topic``; "" = none).
        array_like: legacy array layout instead of vLLM's current tagged maps.
        replay_endpoint: bind a ROUTER socket there serving recent batches again (None: no replay).
    """

    def __init__(self, endpoint: str, topic: str = "", array_like: bool = False,
                 replay_endpoint: str | None = None) -> None:
        self.listener = KVEventRecorder()
        self._publisher = ZmqKVEventPublisher(endpoint, topic, array_like, replay_endpoint)

    def flush(self) -> None:
        """Publish what the cache did since the last flush (nothing when it did nothing)."""
        self._publisher.publish(self.listener.drain())

    def close(self) -> None:
        self._publisher.close()
