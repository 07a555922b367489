"""The hub thread's inbox: update chunks bounded in count and bytes, control events never held up.

Why a bound of our own when the broker has an in-flight window (MQTT 5 receive maximum):
the window is the broker's promise, and not every broker keeps it under load (mosquitto
2.0.11 here delivered about 7,000 unacknowledged 64 KiB chunks to a hub that asked for
1,024, half a gigabyte of the hub's memory at 10,000 devices). When the inbox is full,
``put`` blocks paho's network thread: it stops reading the socket, TCP pushes back, and
the broker keeps the rest, as the window meant it to. Nothing is lost: a chunk not read is
not acknowledged.

The bound is small on purpose: the hub judges one update at a time, so a deep inbox only
holds memory, it does not speed anything up. A few megabytes keep the hub thread busy.

Blocking paho's thread has one hazard: the hub thread itself waiting for the broker (a
publish confirmed by PUBACKs, which paho's thread must read). While it does, it holds
``unbounded()`` and the inbox takes everything; ``close()`` releases a blocked producer
for good when the hub stops. A hub thread stuck for longer than the MQTT keepalive with
a full inbox sends no PINGREQ meanwhile, so the broker drops the connection; paho
reconnects and the broker re-delivers what was not acknowledged (nothing is lost).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["INBOX_BYTES", "IntakeQueue"]

# A few megabytes keep a judging thread busy; more only holds memory (see the module doc).
# 8 MiB before: 4 peaked 4-6 MiB lower at 1,000 and 10,000 devices with rounds as fast
# (two exclusive A/B runs, benchmarks/README.md).
INBOX_BYTES = 4 * 1024 * 1024


class IntakeQueue:
    """FIFO of events; an event put with ``size > 0`` (an update chunk) waits while the queue
    already holds ``max_chunks`` chunks or ``max_bytes`` bytes of them.

    Attributes:
        peak_chunks, peak_bytes: the most chunks and chunk bytes held at once (for tests and
            diagnostics).
    """

    def __init__(self, *, max_chunks: int, max_bytes: int) -> None:
        if max_chunks < 1 or max_bytes < 1:
            raise ValueError(f"max_chunks and max_bytes must be positive, got {max_chunks} and {max_bytes}")
        self.max_chunks = max_chunks
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._chunks = 0
        self._bytes = 0
        self._unbounded = 0
        self._closed = False
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._has_room = threading.Condition(self._lock)
        self.peak_chunks = 0
        self.peak_bytes = 0

    def put(self, event: Any, size: int = 0) -> None:
        """Append ``event``; a chunk (``size > 0``) first waits for room. Control events
        (``size == 0``) never wait, so a reconnect or stop is never stuck behind chunks."""
        with self._lock:
            if size > 0:
                # Room means below the bound, so one chunk larger than max_bytes still gets in.
                while not self._closed and not self._unbounded and (
                        self._chunks >= self.max_chunks or self._bytes >= self.max_bytes):  # fmt: skip
                    self._has_room.wait()
                self._chunks += 1
                self._bytes += size
                self.peak_chunks = max(self.peak_chunks, self._chunks)
                self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._items.append((event, size))
            self._not_empty.notify()

    def get(self, timeout: float) -> Any | None:
        """The oldest event, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._items:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._not_empty.wait(remaining)
            event, size = self._items.popleft()
            if size > 0:
                self._chunks -= 1
                self._bytes -= size
                # A full inbox lets paho's thread read again only once half of it is free: it
                # then reads a burst of chunks in one go, where a wake-up per chunk taken made
                # the two threads hand the GIL to and fro for every update (py-spy: ~10 % of
                # the hub thread's samples in this notify at 10,000 devices).
                if self._chunks <= self.max_chunks // 2 and self._bytes <= self.max_bytes // 2:
                    self._has_room.notify()
            return event

    def empty(self) -> bool:
        with self._lock:
            return not self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._bytes

    @contextlib.contextmanager
    def unbounded(self) -> Iterator[None]:
        """While the consumer waits on the producer's thread (a publish confirmed by the broker),
        nothing waits for room: the producer must stay free to read the confirmations."""
        with self._lock:
            self._unbounded += 1
            self._has_room.notify_all()
        try:
            yield
        finally:
            with self._lock:
                self._unbounded -= 1

    def close(self) -> None:
        """No more waiting for room (the consumer has stopped): blocked and later puts go through."""
        with self._lock:
            self._closed = True
            self._has_room.notify_all()
