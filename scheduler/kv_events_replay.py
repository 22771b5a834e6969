"""The replay side of the KV-event publisher: recent batches served again on request, as vLLM's
``ZmqEventPublisher`` does (``vllm/distributed/kv_events.py``, ``replay_endpoint`` / ``buffer_steps``).

A PUB socket loses what a subscriber missed (it connected late, or dropped messages at its high-water
mark); a subscriber that sees a gap in the sequence numbers asks the ROUTER socket bound at the replay
endpoint for everything from a sequence number on:

* request: ``[b"", start_seq]`` from a DEALER (or REQ) socket, ``start_seq`` 8 bytes big-endian;
* replies: ``[b"", seq, payload]`` for every buffered batch with ``seq >= start_seq``, in order, then the
  end marker ``[b"", -1 as 8 signed big-endian bytes, b""]``.

The last ``buffer_steps`` batches are kept. The ROUTER socket lives on its own thread (a ZMQ socket stays
on one thread), polled every 100 ms; the engine thread only appends to the buffer.
"""

from __future__ import annotations

import threading
from collections import deque

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The marker that ends a replay (vLLM's ``END_SEQ``)."""


class KVEventReplay:
    """Keeps the last ``buffer_steps`` published batches and serves them on the ROUTER socket bound at
    ``endpoint`` (e.g. ``tcp://*:5558``) until :meth:`close`.

    Raises:
        zmq.ZMQError: when ``endpoint`` cannot be bound.
    """

    def __init__(self, endpoint: str, buffer_steps: int = 10_000) -> None:
        import zmq  # pyzmq: only when publishing

        self._zmq = zmq
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._thread = threading.Thread(target=self._serve, name="kv-events-replay", daemon=True)
        self._thread.start()  # the socket is the thread's from here on

    def record(self, seq: int, payload: bytes) -> None:
        """Keep one published batch (engine thread)."""
        with self._lock:
            self._buffer.append((seq, payload))

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            frames = self._socket.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:  # [identity, b"", start_seq]
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            with self._lock:
                batches = [(seq, payload) for seq, payload in self._buffer if seq >= start]
            for seq, payload in batches:
                self._socket.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
            self._socket.send_multipart([identity, b"", END_SEQ, b""])
        self._socket.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
