"""The receiving path as the hub runs it: the sender's SHA-256 computed alongside its HMAC, the
receiver's HMAC computed while chunks arrive, and reassembly limits that hold against hostile senders."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest

from fedvlm.shared.protocol import (
    MIN_CHUNK_SIZE,
    ProtocolError,
    EnvelopeMacObserver,
    EnvelopeMetadata,
    Reassembler,
    ReasonCode,
    SignatureError,
    envelope_mac_observer,
    new_client_secret,
    open_envelope,
    sign,
    sign_for_sending,
    split_payload,
)

SECRETS = {"alice": new_client_secret(), "bob": new_client_secret()}
METADATA = EnvelopeMetadata(federation="fed-1", round=4, client_id="alice", sample_count=130, strategy="plora",
                            base_fingerprint="0123456789abcdef", lora_config_hash="a" * 64)  # fmt: skip


def body_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def reassemble(envelope: bytes, lookup=SECRETS.get, *, shuffle_seed: int | None = None, sha256: bytes | None = None):
    """Through a Reassembler with the hub's observer; returns the completed message."""
    chunks = split_payload(envelope, chunk_size=MIN_CHUNK_SIZE * 4, sha256=sha256)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(chunks)
    reassembler = Reassembler(observe=envelope_mac_observer(lookup))
    completed = [done for chunk in chunks if (done := reassembler.feed(chunk, sender="alice")) is not None]
    assert len(completed) == 1
    return completed[0]


@pytest.mark.parametrize("size", [0, 100, 5000, 2 * 1024 * 1024 + 7])  # both sides of the parallel threshold
def test_sign_for_sending_gives_the_same_envelope_and_its_sha256(size):
    body = body_of(size)
    envelope, digest = sign_for_sending(body, METADATA, "alice", SECRETS["alice"])
    assert envelope == sign(body, METADATA, "alice", SECRETS["alice"])
    assert digest == hashlib.sha256(envelope).digest()
    # The chunks carry that digest, and the receiver's own check agrees with it.
    assert reassemble(envelope, sha256=digest).payload == envelope


@pytest.mark.parametrize("shuffle_seed", [None, 1, 2])
def test_streamed_mac_is_the_envelopes_hmac_whatever_the_chunk_order(shuffle_seed):
    envelope = sign(body_of(60_000, 3), METADATA, "alice", SECRETS["alice"])
    message = reassemble(envelope, shuffle_seed=shuffle_seed)
    observer = message.observer
    assert isinstance(observer, EnvelopeMacObserver)
    key = SECRETS["alice"].encode()
    expected = hmac.new(key, envelope[:-32], hashlib.sha256).digest()
    assert observer.mac_for("alice", key, len(envelope)) == expected
    opened = open_envelope(message.payload, SECRETS.get, expected_client_id="alice", streamed_mac=observer)
    assert opened.metadata == METADATA and opened.body == open_envelope(envelope, SECRETS.get).body


def test_a_tampered_body_fails_with_the_streamed_mac_too():
    envelope = bytearray(sign(body_of(20_000, 4), METADATA, "alice", SECRETS["alice"]))
    envelope[9000] ^= 0x01
    message = reassemble(bytes(envelope))
    with pytest.raises(SignatureError) as refused:
        open_envelope(message.payload, SECRETS.get, streamed_mac=message.observer)
    assert refused.value.reason is ReasonCode.BAD_SIGNATURE


def test_a_secret_changed_mid_transfer_is_checked_against_the_new_one():
    """Revoked or rotated while the chunks were in flight: the MAC streamed under the old
    secret is not used; the envelope is checked against the secret the hub holds now."""
    secrets = dict(SECRETS)
    envelope = sign(body_of(20_000, 5), METADATA, "alice", secrets["alice"])
    message = reassemble(envelope, secrets.get)
    secrets["alice"] = new_client_secret()
    with pytest.raises(SignatureError) as refused:
        open_envelope(message.payload, secrets.get, streamed_mac=message.observer)
    assert refused.value.reason is ReasonCode.BAD_SIGNATURE
    del secrets["alice"]
    with pytest.raises(SignatureError) as unknown:
        open_envelope(message.payload, secrets.get, streamed_mac=message.observer)
    assert unknown.value.reason is ReasonCode.UNKNOWN_CLIENT


def test_an_unknown_signer_or_junk_leaves_the_observer_without_a_mac():
    stranger = sign(body_of(5000, 6), EnvelopeMetadata(federation="fed-1", round=4, client_id="carol",
                                                         sample_count=1, strategy="plora", base_fingerprint="x",
                                                         lora_config_hash="a" * 64),  # fmt: skip
                    "carol", new_client_secret())
    message = reassemble(stranger)
    assert message.observer.mac_for("carol", b"k" * 32, len(stranger)) is None
    with pytest.raises(SignatureError) as unknown:
        open_envelope(message.payload, SECRETS.get, streamed_mac=message.observer)
    assert unknown.value.reason is ReasonCode.UNKNOWN_CLIENT
    junk = reassemble(b"\x00junk" * 500)
    assert junk.observer.mac_for("alice", SECRETS["alice"].encode(), 2500) is None


def test_the_observer_reads_a_signer_split_across_updates():
    """Bytes may come in pieces smaller than the prefix (a caller feeding it directly)."""
    envelope = sign(body_of(3000, 7), METADATA, "alice", SECRETS["alice"])
    observer = EnvelopeMacObserver(SECRETS.get, len(envelope))
    for start in range(0, len(envelope), 3):
        observer.update(memoryview(envelope)[start:start + 3])
    key = SECRETS["alice"].encode()
    assert observer.mac_for("alice", key, len(envelope)) == hmac.new(key, envelope[:-32], hashlib.sha256).digest()
    # Not every byte seen, or another length: no MAC, so open_envelope computes its own.
    partial = EnvelopeMacObserver(SECRETS.get, len(envelope))
    partial.update(memoryview(envelope)[:-1])
    assert partial.mac_for("alice", key, len(envelope)) is None
    assert observer.mac_for("alice", key, len(envelope) + 1) is None


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
