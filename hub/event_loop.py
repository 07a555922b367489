"""The loop of the hub's thread and of a hub worker's: events in arrival order, group commits, a clock.

Both take events off a queue that paho's network thread fills, one at a time, on one
thread that owns everything else (so none of it needs locks), and both must commit a burst
of updates together once it is taken and look at the clock a few times a second even
while a backlog drains. A bug costs one event or one tick, never the thread: the broker
re-sends whatever was not acknowledged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["serve_events"]

log = logging.getLogger(__name__)


def serve_events(events: queue.Queue[tuple[Any, ...]], stop: threading.Event, *, handle: Callable[[tuple[Any, ...]], None],
                 burst_taken: Callable[[], None], tick: Callable[[float], None], tick_s: float, owner: str) -> None:  # fmt: skip
    """Until ``stop`` is set: ``handle`` each event (its first item names it), ``burst_taken``
    once the queue is empty after one, and ``tick(time.monotonic())`` at least every
    ``tick_s``. ``owner`` names the thread in the log ("hub", "worker 1")."""
    last_tick = 0.0
    while not stop.is_set():
        try:
            event = events.get(timeout=tick_s)
        except queue.Empty:
            event = None
        try:
            if event is not None:
                handle(event)
                if events.empty():
                    burst_taken()  # group commit: whatever came in together
            now = time.monotonic()
            if event is None or now - last_tick >= tick_s:
                last_tick = now
                tick(now)
        except Exception:  # a bug must cost one event, never the thread
            log.exception("the %s failed while handling %s", owner, event[0] if event else "a tick")
