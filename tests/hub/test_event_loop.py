"""The event loop's group commit waits a bounded time: not before, not (much) after."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest

from fedvlm.hub.event_loop import serve_events
from fedvlm.hub.intake_queue import IntakeQueue

DELAY_S = 0.05


class _Batch:
    """What the loop sees of an intake: events join a batch; a commit empties it."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.size = 0
        self.commits: list[tuple[int, float]] = []  # (size, how long its oldest event waited)

    def add(self, _event: object) -> None:
        if self.since is None:
            self.since = time.monotonic()
        self.size += 1

    def due(self) -> float | None:
        return None if self.since is None else self.since + DELAY_S

    def commit(self) -> None:
        assert self.since is not None
        self.commits.append((self.size, time.monotonic() - self.since))
        self.since, self.size = None, 0


def _serve(events: Any, batch: _Batch, stop: threading.Event, quiet_commit_s: float = 0.005) -> threading.Thread:
    thread = threading.Thread(target=serve_events, args=(events, stop), daemon=True,
                              kwargs=dict(handle=batch.add, commit=batch.commit, commit_due=batch.due,
                                          tick=lambda _: None, tick_s=1.0, owner="test",
                                          quiet_commit_s=quiet_commit_s))  # fmt: skip
    thread.start()
    return thread


def test_a_batch_commits_once_its_oldest_event_waited_the_bound_even_while_events_keep_coming() -> None:
    events: queue.Queue = queue.Queue()
    batch, stop = _Batch(), threading.Event()
    # No quiet commits here: a loaded machine may stretch a 1 ms sleep past 5 ms.
    thread = _serve(events, batch, stop, quiet_commit_s=1.0)
    end = time.monotonic() + 4 * DELAY_S
    sent = 0
    while time.monotonic() < end:  # an inbox that is never empty for long: one event every ms
        events.put(("update",))
        sent += 1
        time.sleep(0.001)
    time.sleep(2 * DELAY_S)
    stop.set()
    thread.join(2.0)
    assert sum(size for size, _ in batch.commits) == sent  # nothing left waiting
    # Batches of many events, not one commit per moment the inbox was empty.
    assert len(batch.commits) <= 8 and max(size for size, _ in batch.commits) > 10
    for _, waited in batch.commits:
        assert DELAY_S <= waited < DELAY_S + 0.1


@pytest.mark.parametrize("inbox", ["queue.Queue", "IntakeQueue"])
def test_a_lone_event_is_committed_as_soon_as_the_inbox_stays_quiet_not_after_the_whole_bound(inbox: str) -> None:
    """With the hub's own inbox too (its get returns None when nothing came, where
    queue.Queue raises Empty): the quiet commit applies to the hub and its workers."""
    events: Any = queue.Queue() if inbox == "queue.Queue" else IntakeQueue(max_chunks=8, max_bytes=1 << 20)
    batch, stop = _Batch(), threading.Event()
    thread = _serve(events, batch, stop)
    events.put(("update",))
    time.sleep(2 * DELAY_S)
    stop.set()
    thread.join(2.0)
    assert len(batch.commits) == 1 and batch.commits[0][0] == 1
    assert batch.commits[0][1] < DELAY_S / 2  # quiet for 5 ms, not the 50 ms bound
