"""Chunking and reassembly: round trips, reordering, duplicates, corruption, limits, expiry."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest

from fedvlm.shared.protocol import (
    PROTOCOL_VERSION,
    CHUNK_HEADER_SIZE,
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ProtocolError,
    Reassembler,
    ReasonCode,
    expected_chunk_count,
    parse_chunk_header,
    split_payload,
)
from fedvlm.shared.protocol.chunks import _HEADER

CHUNK = MIN_CHUNK_SIZE  # small chunks keep payloads small and chunk counts high


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def payload_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def reassemble(chunks, reassembler=None, sender="client-1"):
    reassembler = reassembler or Reassembler()
    completed = [result for chunk in chunks if (result := reassembler.feed(chunk, sender=sender)) is not None]
    return completed, reassembler


def with_header(chunk: bytes, **changes) -> bytes:
    """The chunk with some header fields rewritten (to forge hostile or broken headers)."""
    fields = dict(zip(("magic", "version", "message_id", "index", "count", "chunk_size", "total_size", "sha256"),
                      _HEADER.unpack_from(chunk)))  # fmt: skip
    fields.update(changes)
    return _HEADER.pack(*fields.values()) + chunk[CHUNK_HEADER_SIZE:]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 37 * CHUNK + 5])
def test_round_trip(size):
    payload = payload_of(size)
    chunks = split_payload(payload, chunk_size=CHUNK)
    assert len(chunks) == expected_chunk_count(size, CHUNK) == max(1, -(-size // CHUNK))
    assert all(len(chunk) <= CHUNK_HEADER_SIZE + CHUNK for chunk in chunks)
    completed, reassembler = reassemble(chunks)
    assert len(completed) == 1
    assert completed[0].payload == payload
    assert completed[0].sender == "client-1"
    assert completed[0].message_id == parse_chunk_header(chunks[0]).message_id
    assert reassembler.pending_message_count == 0 and reassembler.pending_bytes == 0


def test_default_chunk_fills_exactly_256_kib():
    chunks = split_payload(payload_of(DEFAULT_CHUNK_SIZE + 10))
    assert [len(c) for c in chunks] == [256 * 1024, CHUNK_HEADER_SIZE + 10]


def test_header_fields_and_fixed_message_id():
    message_id = bytes(range(16))
    chunks = split_payload(b"x" * (2 * CHUNK + 3), chunk_size=CHUNK, message_id=message_id)
    header = parse_chunk_header(chunks[2])
    assert (header.message_id, header.index, header.count, header.chunk_size, header.total_size) == (
        message_id, 2, 3, CHUNK, 2 * CHUNK + 3)
    assert chunks == split_payload(b"x" * (2 * CHUNK + 3), chunk_size=CHUNK, message_id=message_id)
    assert chunks[0][:4] == b"FVCK" and struct.unpack(">H", chunks[0][4:6]) == (PROTOCOL_VERSION,)


def test_random_reorder_and_duplicates_give_one_message():
    payload = payload_of(50 * CHUNK + 123, seed=1)
    chunks = split_payload(payload, chunk_size=CHUNK)
    rng = random.Random(2)
    shuffled = chunks + rng.sample(chunks, 30)
    rng.shuffle(shuffled)
    # Every chunk once before the end, so the message completes exactly once and every
    # later duplicate (QoS 1 redelivery) is ignored.
    completed, reassembler = reassemble(shuffled + rng.sample(chunks, 10))
    assert [m.payload for m in completed] == [payload]
    assert reassembler.pending_message_count == 0
    assert reassembler.drain_expired() == []


def test_interleaved_messages_and_senders_are_kept_apart():
    first, second = payload_of(5 * CHUNK, 3), payload_of(3 * CHUNK + 7, 4)
    shared_id = b"\x01" * 16
    a = split_payload(first, chunk_size=CHUNK, message_id=shared_id)
    b = split_payload(second, chunk_size=CHUNK, message_id=shared_id)  # same id, another sender
    reassembler = Reassembler()
    results = {}
    for chunk_a, chunk_b in zip(a, b + [None] * len(a)):
        for chunk, sender in ((chunk_a, "alice"), (chunk_b, "bob")):
            if chunk is not None and (message := reassembler.feed(chunk, sender=sender)) is not None:
                results[sender] = message.payload
    assert results == {"alice": first, "bob": second}


def test_corrupted_payload_byte_drops_the_message_as_corrupt():
    payload = payload_of(4 * CHUNK, 5)
    chunks = split_payload(payload, chunk_size=CHUNK)
    damaged = bytearray(chunks[2])
    damaged[CHUNK_HEADER_SIZE + 17] ^= 0x01
    chunks[2] = bytes(damaged)
    reassembler = Reassembler()
    for chunk in chunks[:-1]:
        assert reassembler.feed(chunk, sender="c") is None
    with pytest.raises(ProtocolError) as caught:
        reassembler.feed(chunks[-1], sender="c")
    assert caught.value.reason is ReasonCode.CORRUPT
    assert caught.value.sender == "c" and caught.value.message_id == parse_chunk_header(chunks[0]).message_id
    assert reassembler.pending_bytes == 0
    # Reported once: a redelivered chunk of the dropped message is ignored, not re-started.
    assert reassembler.feed(chunks[0], sender="c") is None
    assert reassembler.pending_message_count == 0


def test_missing_chunk_expires_after_timeout_and_is_reported_once():
    clock = FakeClock()
    reassembler = Reassembler(timeout_s=30, clock=clock)
    chunks = split_payload(payload_of(3 * CHUNK), chunk_size=CHUNK)
    reassembler.feed(chunks[0], sender="slow")
    reassembler.feed(chunks[2], sender="slow")
    clock.now += 29.9
    assert reassembler.drain_expired() == []
    assert reassembler.pending_message_count == 1
    clock.now += 0.2
    expired = reassembler.drain_expired()
    assert [(d.sender, d.reason) for d in expired] == [("slow", ReasonCode.EXPIRED)]
    assert expired[0].message_id == parse_chunk_header(chunks[0]).message_id
    assert "2 of 3 chunks" in expired[0].detail
    assert reassembler.pending_message_count == 0 and reassembler.pending_bytes == 0
    assert reassembler.drain_expired() == []
    # The late chunk neither completes a half message nor restarts one.
    assert reassembler.feed(chunks[1], sender="slow") is None
    assert reassembler.pending_message_count == 0


def test_expiry_during_feed_frees_room_and_is_still_reported():
    clock = FakeClock()
    reassembler = Reassembler(max_pending_messages=1, timeout_s=10, clock=clock)
    stale = split_payload(payload_of(2 * CHUNK, 1), chunk_size=CHUNK)
    fresh = split_payload(payload_of(CHUNK, 2), chunk_size=CHUNK)
    reassembler.feed(stale[0], sender="a")
    clock.now += 11
    assert reassembler.feed(fresh[0], sender="b").payload == payload_of(CHUNK, 2)
    assert [d.sender for d in reassembler.drain_expired()] == ["a"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"total_size": 2**62, "count": 2**32 - 1, "chunk_size": 2**26}, ReasonCode.TOO_LARGE),
        ({"total_size": 10**9}, ReasonCode.TOO_LARGE),
        ({"count": 2**32 - 1}, ReasonCode.INCONSISTENT),
        ({"chunk_size": 1}, ReasonCode.MALFORMED),
        ({"index": 7}, ReasonCode.INCONSISTENT),
        ({"magic": b"XXXX"}, ReasonCode.MALFORMED),
        ({"version": 9}, ReasonCode.UNSUPPORTED_VERSION),
    ],
)
def test_hostile_headers_are_refused_before_allocating(changes, reason):
    chunk = with_header(split_payload(payload_of(2 * CHUNK), chunk_size=CHUNK)[0], **changes)
    reassembler = Reassembler(max_message_bytes=16 * 1024 * 1024, max_pending_bytes=32 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as caught:
            reassembler.feed(chunk, sender="attacker")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason is reason
    assert peak < 256 * 1024
    assert reassembler.pending_bytes == 0 and reassembler.pending_message_count == 0


def test_truncated_header_and_truncated_data():
    chunks = split_payload(payload_of(2 * CHUNK), chunk_size=CHUNK)
    reassembler = Reassembler()
    with pytest.raises(ProtocolError) as caught:
        reassembler.feed(chunks[0][:CHUNK_HEADER_SIZE - 1], sender="c")
    assert caught.value.reason is ReasonCode.TRUNCATED_HEADER
    with pytest.raises(ProtocolError) as caught:
        reassembler.feed(chunks[0][:-1], sender="c")
    assert caught.value.reason is ReasonCode.INCONSISTENT
    # Refusing one chunk does not poison its message: the intact chunks still complete it.
    completed, _ = reassemble(chunks, reassembler, sender="c")
    assert [m.payload for m in completed] == [payload_of(2 * CHUNK)]


def test_chunk_disagreeing_with_first_chunk_is_refused():
    payload = payload_of(3 * CHUNK)
    chunks = split_payload(payload, chunk_size=CHUNK)
    reassembler = Reassembler()
    reassembler.feed(chunks[0], sender="c")
    forged = with_header(chunks[1], sha256=b"\x01" * 32)
    with pytest.raises(ProtocolError, match="SHA-256") as caught:
        reassembler.feed(forged, sender="c")
    assert caught.value.reason is ReasonCode.INCONSISTENT
    assert reassembler.feed(chunks[1], sender="c") is None
    assert reassembler.feed(chunks[2], sender="c").payload == payload


def test_pending_byte_and_message_limits():
    reassembler = Reassembler(max_message_bytes=4 * CHUNK, max_pending_messages=2, max_pending_bytes=6 * CHUNK)
    a, b = (split_payload(payload_of(4 * CHUNK, seed), chunk_size=CHUNK) for seed in (1, 2))
    c, d = (split_payload(payload_of(2 * CHUNK, seed), chunk_size=CHUNK) for seed in (3, 4))

    reassembler.feed(a[0], sender="a")
    assert reassembler.pending_bytes == 4 * CHUNK
    with pytest.raises(ProtocolError, match="pending memory") as caught:
        reassembler.feed(b[0], sender="b")  # 4 + 4 chunks' worth exceeds 6
    assert caught.value.reason is ReasonCode.OVERLOADED and caught.value.sender == "b"
    assert reassembler.feed(b[1], sender="b") is None  # the rest of a refused message is ignored
    assert reassembler.pending_bytes == 4 * CHUNK

    reassembler.feed(c[0], sender="c")  # 4 + 2 fits exactly
    assert reassembler.pending_bytes == 6 * CHUNK
    with pytest.raises(ProtocolError, match="already reassembling 2") as caught:
        reassembler.feed(d[0], sender="d")
    assert caught.value.reason is ReasonCode.OVERLOADED
    assert reassembler.pending_message_count == 2

    completed, _ = reassemble(a[1:], reassembler, sender="a")
    assert [m.payload for m in completed] == [payload_of(4 * CHUNK, 1)]
    assert reassembler.pending_bytes == 2 * CHUNK
    resent = split_payload(payload_of(2 * CHUNK, 4), chunk_size=CHUNK)  # d retries with a new message id
    completed, _ = reassemble(resent, reassembler, sender="d")
    assert [m.payload for m in completed] == [payload_of(2 * CHUNK, 4)]


def test_a_refused_message_stays_refused_past_the_finished_memory():
    """Under load a refused update's later chunks may come after thousands of other refusals:
    they are still ignored (not refused again chunk by chunk, not admitted into a slot they
    cannot fill), however short the memory of finished messages."""
    reassembler = Reassembler(max_message_bytes=4 * CHUNK, max_pending_messages=1, max_pending_bytes=8 * CHUNK)
    holder = split_payload(payload_of(2 * CHUNK, 1), chunk_size=CHUNK)
    refused = split_payload(payload_of(2 * CHUNK, 2), chunk_size=CHUNK)
    reassembler.feed(holder[0], sender="holder")  # takes the only slot
    with pytest.raises(ProtocolError):
        reassembler.feed(refused[0], sender="late")
    for index in range(2000):  # more refusals than the 1,024 finished messages remembered
        other = split_payload(payload_of(2 * CHUNK, 100 + index), chunk_size=CHUNK)
        with pytest.raises(ProtocolError):
            reassembler.feed(other[0], sender=f"other-{index}")
    assert reassembler.feed(holder[1], sender="holder") is not None  # the slot is free again
    assert reassembler.feed(refused[1], sender="late") is None
    assert reassembler.pending_message_count == 0


def test_oversized_message_is_refused_once():
    reassembler = Reassembler(max_message_bytes=2 * CHUNK, max_pending_bytes=2 * CHUNK)
    chunks = split_payload(payload_of(3 * CHUNK), chunk_size=CHUNK)
    with pytest.raises(ProtocolError) as caught:
        reassembler.feed(chunks[0], sender="c")
    assert caught.value.reason is ReasonCode.TOO_LARGE
    assert [reassembler.feed(chunk, sender="c") for chunk in chunks[1:]] == [None, None]
    assert reassembler.pending_bytes == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_message_bytes": 0}, {"max_pending_messages": -1}, {"timeout_s": 0},
     {"max_message_bytes": 10 * CHUNK, "max_pending_bytes": 5 * CHUNK}],
)
def test_reassembler_refuses_unusable_limits(kwargs):
    with pytest.raises(ValueError):
        Reassembler(**kwargs)


@pytest.mark.parametrize("chunk_size", [0, MIN_CHUNK_SIZE - 1, 2**31, 1.5, True])
def test_split_refuses_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        split_payload(b"abc", chunk_size=chunk_size)


def test_split_refuses_bad_message_id():
    with pytest.raises(ValueError, match="16 bytes"):
        split_payload(b"abc", message_id=b"short")
