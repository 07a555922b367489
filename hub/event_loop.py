"""The loop of the hub's thread and of a hub worker's: events in arrival order, group commits
that wait a bounded time, a clock.

Both take events off a queue that paho's network thread fills, one at a time, on one
thread that owns everything else (so none of it needs locks), and both must commit accepted
updates in batches that wait a bounded time and look at the clock a few times a second even
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
                 commit: Callable[[], object], commit_due: Callable[[], float | None], tick: Callable[[float], None],
                 tick_s: float, owner: str, quiet_commit_s: float = 0.005) -> None:  # fmt: skip
    """Until ``stop`` is set: ``handle`` each event (its first item names it), ``commit()``
    once the time ``commit_due()`` gives (``time.monotonic()``; None: nothing waits) has
    passed, or as soon as the inbox has stayed empty for ``quiet_commit_s`` with a batch
    waiting, and ``tick(time.monotonic())`` every ``tick_s``. The wait for the next event
    ends at whichever comes first, so a batch never waits longer than its bound, busy inbox
    or idle. ``owner`` names the thread in the log ("hub", "worker 1").

    Why the quiet commit: under load the inbox is never quiet for 5 ms and batches fill to
    their size or bound; a lone update (a small federation, a test) is acknowledged within
    a few milliseconds instead of waiting the whole bound for company that is not coming.
    Committing at the first instant the inbox is empty made many one-update transactions
    under load, each with its own fsync."""
    last_tick = 0.0
    while not stop.is_set():
        now = time.monotonic()
        wait = last_tick + tick_s - now
        due = commit_due()
        if due is not None:
            wait = min(wait, due - now, quiet_commit_s)
        try:
            event = events.get(timeout=max(0.0, wait))
        except queue.Empty:
            event = None
        # Nothing came within the wait: queue.Queue raises Empty, the hub's IntakeQueue returns
        # None (with only the first seen as quiet, the quiet commit never ran in the hub).
        quiet = event is None
        try:
            if event is not None:
                handle(event)
            now = time.monotonic()
            due = commit_due()
            if due is not None and (now >= due or quiet):
                commit()  # group commit: the batch waited its bound, or nothing more is coming
            if now - last_tick >= tick_s:
                last_tick = now
                tick(now)
        except Exception:  # a bug must cost one event, never the thread
            log.exception("the %s failed while handling %s", owner, event[0] if event else "a tick")
