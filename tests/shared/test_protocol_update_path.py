"""The update path as the edge and the hub run it: signed and chunked in one pass while it is
published (``SignedUpload``), reassembled with the signed part's SHA-256 taken on the receiver's
one hashing pass, and reassembly limits that hold against hostile senders."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest

from fedvlm.shared.protocol import (
    CHUNK_HEADER_SIZE,
    MAC_SIZE,
    MIN_CHUNK_SIZE,
    SHA256_NOT_STATED,
    ChunkStream,
    ProtocolError,
    Reassembler,
    ReasonCode,
    SignatureError,
    SignedUpload,
    new_client_secret,
    open_envelope,
    parse_chunk_header,
    seal_envelope,
    sign,
    split_payload,
)
from fedvlm.shared.usage_error import UsageError
from tests.shared.test_protocol_signing import METADATA, SECRETS

CHUNK = MIN_CHUNK_SIZE * 4


def body_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def envelope_size(body_size: int) -> int:
    return len(sign(bytes(body_size), METADATA, "alice", SECRETS["alice"]))


def reassemble(chunks: list[bytes], *, shuffle_seed: int | None = None, sender: str = "alice"):
    """Through a Reassembler set up as the hub's; returns the completed message."""
    chunks = list(chunks)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(chunks)
    reassembler = Reassembler(trailer_size=MAC_SIZE)
    completed = [done for chunk in chunks if (done := reassembler.feed(chunk, sender=sender)) is not None]
    assert len(completed) == 1
    return completed[0]


def streamed(body: bytes, chunk_size: int = CHUNK, **kwargs) -> tuple[SignedUpload, list[bytes]]:
    upload = SignedUpload(body, METADATA, "alice", SECRETS["alice"], chunk_size=chunk_size, **kwargs)
    return upload, list(upload.chunks())


# Body sizes around the chunk boundaries, including a last chunk shorter than the MAC (the
# one before it then holds part of the MAC) and an envelope that fills its chunks exactly.
_BASE = envelope_size(0)
EDGE_SIZES = [0, 100, 3 * CHUNK - _BASE, 3 * CHUNK - _BASE - 10, 3 * CHUNK - _BASE + 5, 2 * 1024 * 1024 + 7]


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_a_streamed_upload_is_the_signed_envelope_with_its_digest_in_the_last_chunk(size):
    body = body_of(size)
    upload, chunks = streamed(body)
    envelope = sign(body, METADATA, "alice", SECRETS["alice"])
    headers = [parse_chunk_header(chunk) for chunk in chunks]
    assert b"".join(chunk[CHUNK_HEADER_SIZE:] for chunk in chunks) == envelope
    assert upload.envelope_size == len(envelope) and upload.chunk_count == len(chunks) == headers[0].count
    assert [h.index for h in headers] == list(range(len(chunks)))
    assert all(h.sha256 == SHA256_NOT_STATED for h in headers[:-1])
    assert headers[-1].sha256 == hashlib.sha256(envelope).digest()
    assert {h.message_id for h in headers} == {upload.message_id}
    assert upload.sent == chunks
    message = reassemble(chunks)
    assert message.payload == envelope
    opened = open_envelope(message.payload, SECRETS.get, expected_client_id="alice",
                           signed_sha256=message.head_sha256)  # fmt: skip
    assert opened.metadata == METADATA and opened.body == body


def test_the_mac_signs_the_sha256_of_the_signed_part():
    envelope = sign(body_of(5000, 1), METADATA, "alice", SECRETS["alice"])
    signed = envelope[:-MAC_SIZE]
    # The spec, written out: HMAC-SHA256(secret, b"fedvlm envelope\0" + SHA-256(signed part)).
    expected = hmac.new(SECRETS["alice"].encode(), b"fedvlm envelope\x00" + hashlib.sha256(signed).digest(),
                        hashlib.sha256).digest()  # fmt: skip
    assert envelope[-MAC_SIZE:] == expected


def test_chunks_are_produced_one_at_a_time_and_the_save_is_awaited_before_the_last():
    """The first chunk exists before the rest is hashed; before_last_chunk runs after every
    chunk but the last, so a device waiting there for its save cannot have an update
    accepted that it has not kept."""
    body = body_of(10 * CHUNK, 2)
    upload = SignedUpload(body, METADATA, "alice", SECRETS["alice"], chunk_size=CHUNK)
    chunks_before_last: list[int] = []
    producer = upload.chunks(before_last_chunk=lambda: chunks_before_last.append(len(upload.sent)))
    first = next(producer)
    assert upload.sent == [first] and not chunks_before_last
    rest = list(producer)
    assert chunks_before_last == [upload.chunk_count - 1]
    assert [first, *rest] == upload.sent
    with pytest.raises(RuntimeError, match="already produced"):
        upload.chunks()


@pytest.mark.parametrize("size", EDGE_SIZES[:3])
def test_the_signed_part_sealed_again_is_the_envelope_that_was_sent(size):
    """What a device saves while it publishes (the envelope without its MAC, known before
    any hashing) seals again into exactly the bytes the hub received."""
    body = body_of(size, 12)
    upload, chunks = streamed(body)
    signed_part = b"".join(upload.signed_part)
    sealed = seal_envelope(signed_part, SECRETS["alice"])
    assert sealed == reassemble(chunks).payload == sign(body, METADATA, "alice", SECRETS["alice"])
    for junk in (b"FVSE", sealed):  # too short; a whole envelope (its body length leaves no room for a MAC)
        with pytest.raises(ProtocolError) as refused:
            seal_envelope(junk, SECRETS["alice"])
        assert refused.value.reason is ReasonCode.MALFORMED


def test_a_failing_save_stops_the_stream_before_the_last_chunk():
    upload = SignedUpload(body_of(4 * CHUNK, 11), METADATA, "alice", SECRETS["alice"], chunk_size=CHUNK)

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        list(upload.chunks(before_last_chunk=disk_full))
    assert len(upload.sent) == upload.chunk_count - 1  # the last chunk never left


def test_an_upload_refuses_bad_arguments_before_producing_anything():
    with pytest.raises(UsageError, match="new_client_secret"):
        SignedUpload(b"x", METADATA, "alice", "short")
    with pytest.raises(ProtocolError) as mismatch:
        SignedUpload(b"x", METADATA, "bob", SECRETS["bob"])
    assert mismatch.value.reason is ReasonCode.CLIENT_MISMATCH
    with pytest.raises(ValueError, match="chunk_size"):
        SignedUpload(b"x", METADATA, "alice", SECRETS["alice"], chunk_size=10)


@pytest.mark.parametrize("shuffle_seed", [1, 2, 3])
def test_the_signed_digest_is_right_whatever_the_chunk_order(shuffle_seed):
    body = body_of(3 * CHUNK - _BASE - 10, 4)  # the MAC straddles the last two chunks
    _, chunks = streamed(body)
    envelope = sign(body, METADATA, "alice", SECRETS["alice"])
    message = reassemble(chunks, shuffle_seed=shuffle_seed)
    assert message.head_sha256 == hashlib.sha256(envelope[:-MAC_SIZE]).digest()
    assert open_envelope(message.payload, SECRETS.get, signed_sha256=message.head_sha256).body == body


def test_a_resend_with_the_digest_in_every_chunk_completes_a_streamed_message():
    """After a restart the device re-sends its saved envelope with split_payload (digest in
    every chunk) under the same message id: chunks of both sendings make one message."""
    body = body_of(5 * CHUNK, 5)
    upload, streamed_chunks = streamed(body)
    envelope = sign(body, METADATA, "alice", SECRETS["alice"])
    resent = split_payload(envelope, chunk_size=CHUNK, message_id=upload.message_id)
    mixed = [streamed_chunks[i] if i % 2 else resent[i] for i in range(len(resent))]
    assert reassemble(mixed, shuffle_seed=6).payload == envelope


def test_a_tampered_body_fails_its_signature():
    _, chunks = streamed(body_of(5 * CHUNK, 7))
    envelope = bytearray(b"".join(chunk[CHUNK_HEADER_SIZE:] for chunk in chunks))
    envelope[9000] ^= 0x01
    # Re-chunked with a digest that matches the altered bytes: only the signature can tell.
    message = reassemble(split_payload(bytes(envelope), chunk_size=CHUNK))
    with pytest.raises(SignatureError) as refused:
        open_envelope(message.payload, SECRETS.get, signed_sha256=message.head_sha256)
    assert refused.value.reason is ReasonCode.BAD_SIGNATURE


def test_a_digest_of_other_bytes_fails_the_signature_and_a_secret_changed_in_flight_is_used():
    body = body_of(4000, 8)
    envelope = sign(body, METADATA, "alice", SECRETS["alice"])
    with pytest.raises(SignatureError) as wrong_digest:
        open_envelope(envelope, SECRETS.get, signed_sha256=hashlib.sha256(b"other").digest())
    assert wrong_digest.value.reason is ReasonCode.BAD_SIGNATURE
    with pytest.raises(ValueError, match="32-byte"):
        open_envelope(envelope, SECRETS.get, signed_sha256=b"short")
    rotated = {**SECRETS, "alice": new_client_secret()}  # rotated while the chunks travelled
    with pytest.raises(SignatureError) as refused:
        open_envelope(envelope, rotated.get, signed_sha256=hashlib.sha256(envelope[:-MAC_SIZE]).digest())
    assert refused.value.reason is ReasonCode.BAD_SIGNATURE


def test_the_last_chunk_must_state_the_digest():
    _, chunks = streamed(body_of(3 * CHUNK, 9))
    unstated = bytearray(chunks[-1])
    unstated[42:74] = SHA256_NOT_STATED
    reassembler = Reassembler(trailer_size=MAC_SIZE)
    with pytest.raises(ProtocolError) as refused:
        reassembler.feed(bytes(unstated), sender="alice")
    assert refused.value.reason is ReasonCode.MALFORMED and "last chunk" in str(refused.value)


def test_chunks_stating_different_digests_are_refused_and_a_wrong_digest_drops_the_message():
    body = body_of(3 * CHUNK, 10)
    _, chunks = streamed(body)
    reassembler = Reassembler(trailer_size=MAC_SIZE)
    disagreeing = bytearray(chunks[0])
    disagreeing[42:74] = b"\x01" * 32  # states a digest the last chunk contradicts
    assert reassembler.feed(bytes(disagreeing), sender="alice") is None
    with pytest.raises(ProtocolError) as refused:
        reassembler.feed(chunks[-1], sender="alice")
    assert refused.value.reason is ReasonCode.INCONSISTENT and "SHA-256" in str(refused.value)
    # A last chunk stating the wrong digest: the reassembled bytes do not match, dropped as corrupt.
    wrong_last = bytearray(chunks[-1])
    wrong_last[42:74] = b"\x02" * 32
    fresh = Reassembler(trailer_size=MAC_SIZE)
    for chunk in chunks[:-1]:
        assert fresh.feed(chunk, sender="alice") is None
    with pytest.raises(ProtocolError) as corrupt:
        fresh.feed(bytes(wrong_last), sender="alice")
    assert corrupt.value.reason is ReasonCode.CORRUPT


def test_head_digest_edges():
    """trailer_size 0: no head digest; a payload shorter than the trailer: none either;
    a payload exactly the trailer: the digest of nothing."""
    plain = reassemble(split_payload(b"q" * 5000, chunk_size=MIN_CHUNK_SIZE))
    assert plain.head_sha256 is not None  # reassemble() sets trailer_size=MAC_SIZE
    assert Reassembler().feed(split_payload(b"q" * 10)[0], sender="a").head_sha256 is None
    assert Reassembler(trailer_size=32).feed(split_payload(b"q" * 10)[0], sender="a").head_sha256 is None
    exact = Reassembler(trailer_size=32).feed(split_payload(b"q" * 32)[0], sender="a")
    assert exact.head_sha256 == hashlib.sha256(b"").digest()
    with pytest.raises(ValueError, match="trailer_size"):
        Reassembler(trailer_size=-1)


def test_chunk_stream_refuses_too_many_bytes_and_an_early_finish():
    stream = ChunkStream(3000, chunk_size=MIN_CHUNK_SIZE)
    first = stream.add(b"a" * 1500)
    assert len(first) == 1 and parse_chunk_header(first[0]).sha256 == SHA256_NOT_STATED
    assert stream.add(b"") == []
    with pytest.raises(ValueError, match="exceed"):
        stream.add(b"b" * 2000)
    with pytest.raises(ValueError, match="add them all"):
        stream.finish()
    stream.add(b"c" * 1500)
    last = stream.finish()
    assert parse_chunk_header(last).sha256 == hashlib.sha256(b"a" * 1500 + b"c" * 1500).digest()
    with pytest.raises(ValueError, match="finish once"):
        stream.finish()
    with pytest.raises(ValueError, match="total_size"):
        ChunkStream(-1)


def test_split_payload_checks_a_given_digest_is_a_digest():
    with pytest.raises(ValueError, match="32-byte SHA-256"):
        split_payload(b"x" * 10, sha256=b"short")


def test_forget_lets_a_completed_message_be_reassembled_again():
    chunks = split_payload(b"y" * 5000, chunk_size=MIN_CHUNK_SIZE)
    reassembler = Reassembler()
    assert [reassembler.feed(c, sender="a") for c in chunks][-1] is not None
    assert all(reassembler.feed(c, sender="a") is None for c in chunks)  # remembered: ignored
    reassembler.forget("a", chunks[0][6:22])
    assert [reassembler.feed(c, sender="a") for c in chunks][-1].payload == b"y" * 5000


def test_memory_follows_the_bytes_received_not_the_size_a_header_declares():
    """A first chunk declaring 200 MB must not make the receiver allocate 200 MB."""
    import tracemalloc

    header_only = split_payload(bytes(200 * 1024 * 1024 // 1000), chunk_size=MIN_CHUNK_SIZE)  # 200 KB, many chunks
    reassembler = Reassembler(max_message_bytes=256 * 1024 * 1024, max_pending_bytes=1024 * 1024 * 1024)
    huge = bytearray(header_only[0])
    huge[34:42] = (200 * 1024 * 1024).to_bytes(8, "big")  # total size
    huge[26:30] = (200 * 1024 * 1024 // MIN_CHUNK_SIZE).to_bytes(4, "big")  # the matching chunk count
    tracemalloc.start()
    try:
        assert reassembler.feed(bytes(huge), sender="a") is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reassembler.pending_message_count == 1
    assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated for one 1 KiB chunk"


def test_one_sender_cannot_take_every_pending_slot():
    reassembler = Reassembler(max_pending_per_sender=2)
    first_chunks = [split_payload(b"z" * 3000, chunk_size=MIN_CHUNK_SIZE)[0] for _ in range(3)]
    assert reassembler.feed(first_chunks[0], sender="greedy") is None
    assert reassembler.feed(first_chunks[1], sender="greedy") is None
    with pytest.raises(ProtocolError) as refused:
        reassembler.feed(first_chunks[2], sender="greedy")
    assert refused.value.reason is ReasonCode.OVERLOADED and "per sender" in str(refused.value)
    honest = split_payload(b"h" * 3000, chunk_size=MIN_CHUNK_SIZE)
    assert [reassembler.feed(c, sender="honest") for c in honest][-1].payload == b"h" * 3000


def test_one_sender_cannot_declare_all_the_pending_bytes():
    reassembler = Reassembler(max_message_bytes=64 * 1024, max_pending_bytes=256 * 1024)
    first = split_payload(bytes(60 * 1024), chunk_size=MIN_CHUNK_SIZE)[0]
    second = split_payload(bytes(60 * 1024), chunk_size=MIN_CHUNK_SIZE)[0]
    assert reassembler.feed(first, sender="greedy") is None
    with pytest.raises(ProtocolError) as refused:
        reassembler.feed(second, sender="greedy")  # 120 KiB declared: over its 64 KiB share
    assert refused.value.reason is ReasonCode.OVERLOADED and "per sender" in str(refused.value)
    assert reassembler.feed(second, sender="honest") is None  # the room is still there for others
