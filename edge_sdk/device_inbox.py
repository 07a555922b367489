"""The device's events, in the order they happened.

MQTT callbacks (paho's thread) only ``put``; the device's own thread ``get``s. While the
device waits for its update's acknowledgement it reads past other events (the hub's state,
manifests, global chunks) and hands them back with ``put_back``: they go to the front, so
they are handled before anything that arrived after them. Put back at the end, an old
retained manifest (re-delivered after a reconnect) would be handled after the newer one the
hub published meanwhile, and the device would fetch a version nobody publishes any more.
"""

from __future__ import annotations

import collections
import queue
from collections.abc import Sequence

__all__ = ["DeviceInbox"]

Event = tuple[str, bytes]


class DeviceInbox:
    def __init__(self) -> None:
        self._arrived: queue.Queue[Event] = queue.Queue()
        self._put_back: collections.deque[Event] = collections.deque()  # the device's thread only

    def put(self, event: Event) -> None:
        """Any thread: an event that just happened."""
        self._arrived.put(event)

    def get(self, timeout: float) -> Event:
        """The device's thread: the oldest event; raises ``queue.Empty`` after ``timeout`` s."""
        if self._put_back:
            return self._put_back.popleft()
        return self._arrived.get(timeout=timeout)

    def put_back(self, events: Sequence[Event]) -> None:
        """The device's thread: events it took but did not handle, in their order, ahead of the rest."""
        self._put_back.extendleft(reversed(events))

    def pending(self) -> list[Event]:
        """Everything not yet taken, in the order ``get`` returns it."""
        return list(self._put_back) + list(self._arrived.queue)
