"""The hub's inbox: update chunks wait for room (back-pressure on paho's thread), control
events never do, and nothing ever waits while the hub thread waits on the broker or has stopped."""

from __future__ import annotations

import threading
import time

import pytest

from fedvlm.hub.intake_queue import IntakeQueue


def _producer(inbox: IntakeQueue, count: int, size: int) -> tuple[threading.Thread, list[int]]:
    """A thread putting ``count`` chunks of ``size`` bytes, as paho's thread does."""
    put: list[int] = []

    def run() -> None:
        for index in range(count):
            inbox.put(("update", index), size=size)
            put.append(index)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, put


def _settle(put: list[int], expected: int) -> int:
    """How many the producer got in: once it reached ``expected``, and a moment later (it
    must be waiting for room then, not still putting)."""
    deadline = time.monotonic() + 10
    while len(put) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    return len(put)


def test_chunks_never_exceed_the_window_and_all_arrive_in_order():
    inbox = IntakeQueue(max_chunks=8, max_bytes=1 << 30)
    thread, put = _producer(inbox, 100, size=1000)
    assert _settle(put, 8) == 8  # the ninth waits for room
    taken = []
    while len(taken) < 100:
        event = inbox.get(timeout=5)
        assert event is not None
        taken.append(event[1])
    thread.join(5)
    assert taken == list(range(100))
    assert inbox.peak_chunks == 8


def test_bytes_bound_the_inbox_too_and_one_oversized_chunk_still_gets_in():
    inbox = IntakeQueue(max_chunks=1000, max_bytes=10_000)
    thread, put = _producer(inbox, 50, size=3000)
    assert _settle(put, 4) == 4  # room while below 10,000 bytes: 0, 3,000, 6,000, 9,000
    assert inbox.held_bytes == 12_000
    while inbox.get(timeout=0.5) is not None:
        pass
    thread.join(5)
    assert inbox.peak_bytes == 12_000  # never more than the bound plus one chunk
    big = IntakeQueue(max_chunks=10, max_bytes=100)
    big.put("huge", size=1_000_000)  # an empty inbox takes any chunk: a large one is never stuck
    assert big.get(timeout=1) == "huge"


def test_control_events_pass_a_full_inbox():
    inbox = IntakeQueue(max_chunks=1, max_bytes=1 << 20)
    inbox.put(("update", 0), size=10)
    done = threading.Event()
    threading.Thread(target=lambda: (inbox.put(("reconnected",)), done.set()), daemon=True).start()
    assert done.wait(5)
    assert [inbox.get(timeout=1), inbox.get(timeout=1)] == [("update", 0), ("reconnected",)]
    assert inbox.get(timeout=0.05) is None


@pytest.mark.parametrize("release", ["unbounded", "close"])
def test_nothing_waits_while_the_hub_waits_on_the_broker_or_has_stopped(release):
    inbox = IntakeQueue(max_chunks=2, max_bytes=1 << 20)
    thread, put = _producer(inbox, 20, size=10)
    assert _settle(put, 2) == 2
    if release == "close":
        inbox.close()
        thread.join(5)
    else:
        with inbox.unbounded():
            thread.join(5)
        assert len(inbox) == 20
    assert not thread.is_alive() and len(put) == 20
