"""KV-cache events in vLLM's wire format, fed by the prefix cache (``BlockManager(listener=...)``).

vLLM publishes what each engine's prefix cache holds so a KV-aware router can route by it
(``vllm/distributed/kv_events.py``; its example subscriber ``examples/online_serving/kv_events_subscriber.py``):

* ``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium)``: full blocks
  newly cached, in order; ``token_ids`` are their tokens concatenated (``block_size`` per block),
  ``parent_block_hash`` the hash of the block before the first one (None at the start of a prompt);
* ``BlockRemoved(block_hashes, medium)``: blocks evicted;
* ``AllBlocksCleared()``.

On the wire (msgspec ``array_like`` + ``tag``): an ``EventBatch`` is the msgpack array
``[ts, [event, ...]]`` (``data_parallel_rank`` appended when set) and each event the array
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`` (the tag
first, fields in declaration order). The ZMQ publisher sends each batch as the multipart message
``[topic, sequence number (8 bytes, big-endian), payload]`` on a PUB socket.

Block hashes here are this cache's chained keys (``BlockKey.hash``, Python ints): they identify blocks
consistently within one replica's stream (stored then removed), which is what an event consumer indexes
on; a router that hashes token ids itself uses ``token_ids`` and ``block_size``.

Not wired into ``sparkserve serve`` yet (see docs/scale_out.md): nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from typing import Protocol

from sparkserve.scheduler.block_manager import BlockKey

MEDIUM = "CPU"
"""vLLM's ``medium`` names where the blocks live ("GPU", "CPU" ...); this engine's KV lives in host memory
on the CPU (a CUDA deployment would report "GPU")."""


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM


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
        self.events.append(BlockStored([k.hash for k in keys], keys[0].parent_hash, tokens, block_size))

    def on_blocks_removed(self, hashes: Sequence[int]) -> None:
        self.events.append(BlockRemoved(list(hashes)))

    def drain(self) -> list[KVCacheEvent]:
        out, self.events = self.events, []
        return out


def encode_event_batch(events: Sequence[KVCacheEvent], ts: float | None = None,
                       data_parallel_rank: int | None = None) -> bytes:
    """msgpack bytes of one ``EventBatch`` (module docstring); ``ts`` in seconds since the epoch.

    Needs ``msgpack`` (installed with pyzmq's users such as the ``test`` extra; not a core dependency)."""
    import msgpack
    batch: list[object] = [time.time() if ts is None else ts,
                           [[type(e).__name__, *astuple(e)] for e in events]]
    if data_parallel_rank is not None:
        batch.append(data_parallel_rank)
    return msgpack.packb(batch)


class ZmqKVEventPublisher:
    """Publishes event batches on a ZMQ PUB socket bound to ``endpoint`` (e.g. ``tcp://*:5557``, vLLM's
    default), as ``[topic, seq, payload]`` with ``seq`` counting batches from 0."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        import zmq  # pyzmq: only when publishing

        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.bind(endpoint)
        self._topic = topic.encode()
        self._seq = 0

    def publish(self, events: Sequence[KVCacheEvent]) -> None:
        if not events:
            return
        self._socket.send_multipart([self._topic, self._seq.to_bytes(8, "big"), encode_event_batch(events)])
        self._seq += 1

    def close(self) -> None:
        self._socket.close(linger=0)
