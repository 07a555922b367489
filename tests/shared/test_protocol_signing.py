"""Signed envelopes: round trip, tampering anywhere, unknown clients, wrong secrets, impersonation."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct

import pytest

from fedvlm.shared.protocol import (
    MAC_CONTEXT,
    PROTOCOL_VERSION,
    EnvelopeMetadata,
    ProtocolError,
    ReasonCode,
    SignatureError,
    new_client_secret,
    open_envelope,
    sign,
)

SECRETS = {"alice": new_client_secret(), "bob": new_client_secret()}
METADATA = EnvelopeMetadata(federation="fed-1", round=4, client_id="alice", sample_count=130, strategy="plora",
                            base_fingerprint="0123456789abcdef", lora_config_hash="a" * 64)  # fmt: skip
BODY = bytes(range(256)) * 40


def open_as_hub(data: bytes, **kwargs):
    return open_envelope(data, SECRETS.get, **kwargs)


def test_sign_and_open_round_trip():
    envelope = sign(BODY, METADATA, "alice", SECRETS["alice"])
    opened = open_as_hub(envelope, expected_client_id="alice")
    assert opened.client_id == "alice"
    assert opened.metadata == METADATA
    assert opened.body == BODY
    assert envelope[:4] == b"FVSE"


def test_empty_body_and_metadata_given_as_dict():
    envelope = sign(b"", METADATA.to_dict(), "alice", SECRETS["alice"].encode())
    assert open_as_hub(envelope).body == b""


def test_new_client_secrets_are_long_and_distinct():
    secrets = {new_client_secret() for _ in range(20)}
    assert len(secrets) == 20
    assert all(len(s) >= 40 for s in secrets)


def test_every_tampered_byte_is_refused():
    envelope = sign(b"tensor bytes" * 3, METADATA, "alice", SECRETS["alice"])
    signer_end = 7 + len("alice")
    for position in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[position] ^= 0x20
        with pytest.raises(ProtocolError) as caught:
            open_as_hub(bytes(tampered))
        if position >= signer_end:
            # Everything after the signer's id is covered by the HMAC and read only after it.
            assert isinstance(caught.value, SignatureError), position
            assert caught.value.reason is ReasonCode.BAD_SIGNATURE, position


def test_truncated_or_extended_envelope_fails_signature():
    envelope = sign(BODY, METADATA, "alice", SECRETS["alice"])
    for broken in (envelope[:-1], envelope + b"\x00", envelope[:-40] + envelope[-32:]):
        with pytest.raises(SignatureError) as caught:
            open_as_hub(broken)
        assert caught.value.reason is ReasonCode.BAD_SIGNATURE


def test_wrong_secret():
    envelope = sign(BODY, METADATA, "alice", new_client_secret())
    with pytest.raises(SignatureError, match="HMAC") as caught:
        open_as_hub(envelope)
    assert caught.value.reason is ReasonCode.BAD_SIGNATURE and caught.value.sender == "alice"


def test_unknown_client():
    metadata = dataclasses.replace(METADATA, client_id="mallory")
    envelope = sign(BODY, metadata, "mallory", new_client_secret())
    with pytest.raises(SignatureError, match="register") as caught:
        open_as_hub(envelope)
    assert caught.value.reason is ReasonCode.UNKNOWN_CLIENT


def test_signer_must_be_the_client_in_metadata():
    with pytest.raises(ProtocolError) as caught:
        sign(BODY, METADATA, "bob", SECRETS["bob"])
    assert caught.value.reason is ReasonCode.CLIENT_MISMATCH


def test_hub_side_catches_metadata_naming_another_client():
    # A client bypassing sign()'s check: correctly signed by bob, metadata claims alice.
    metadata_json = b'{"federation":"fed-1","round":4,"client_id":"alice","sample_count":1,"strategy":"plora",' \
                    b'"base_fingerprint":"f","lora_config_hash":"h","kind":"update"}'
    signed = b"FVSE" + struct.pack(">HB", PROTOCOL_VERSION, 3) + b"bob" + struct.pack(">I", len(metadata_json)) + metadata_json \
        + struct.pack(">Q", 0)  # fmt: skip
    forged = signed + hmac.new(SECRETS["bob"].encode(), MAC_CONTEXT + hashlib.sha256(signed).digest(),
                               hashlib.sha256).digest()  # fmt: skip
    with pytest.raises(SignatureError) as caught:
        open_as_hub(forged)
    assert caught.value.reason is ReasonCode.CLIENT_MISMATCH


def test_signer_must_match_the_topic_client():
    envelope = sign(BODY, METADATA, "alice", SECRETS["alice"])
    with pytest.raises(SignatureError) as caught:
        open_as_hub(envelope, expected_client_id="bob")
    assert caught.value.reason is ReasonCode.CLIENT_MISMATCH


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", ReasonCode.MALFORMED),
        (b"PK\x03\x04" + bytes(60), ReasonCode.MALFORMED),
        (b"FVSE" + struct.pack(">HB", PROTOCOL_VERSION + 1, 5) + b"alice" + bytes(44), ReasonCode.UNSUPPORTED_VERSION),
        (b"FVSE" + struct.pack(">HB", 1, 5) + b"alice" + bytes(44), ReasonCode.UNSUPPORTED_VERSION),  # an older peer
        (b"FVSE" + struct.pack(">HB", PROTOCOL_VERSION, 0) + bytes(50), ReasonCode.MALFORMED),
        (b"FVSE" + struct.pack(">HB", PROTOCOL_VERSION, 3) + b"a/b" + bytes(44), ReasonCode.MALFORMED),
    ],
)
def test_malformed_prefix(data, reason):
    with pytest.raises(ProtocolError) as caught:
        open_as_hub(data)
    assert caught.value.reason is reason
    assert not isinstance(caught.value, SignatureError)


def test_short_secret_is_refused_on_both_sides():
    with pytest.raises(ValueError, match="new_client_secret"):
        sign(BODY, METADATA, "alice", "short")
    envelope = sign(BODY, METADATA, "alice", SECRETS["alice"])
    with pytest.raises(ValueError, match="new_client_secret"):
        open_envelope(envelope, lambda client_id: b"short")


def test_a_validly_signed_but_truncated_envelope_is_malformed_not_a_crash():
    """A client holding a real secret may still send garbage: it must be refused cleanly."""
    import hashlib
    import hmac as hmac_module
    import struct

    from fedvlm.shared.protocol import ProtocolError, ReasonCode, open_envelope
    from fedvlm.shared.protocol.signing import ENVELOPE_MAGIC, _secret_key
    from fedvlm.shared.protocol.version import PROTOCOL_VERSION

    client, secret = "a-rather-long-client-identifier", "s" * 32
    for extra in (b"", b"\x00", b"\x00\x00\x00\x00\x00"):
        signed = struct.pack(">4sHB", ENVELOPE_MAGIC, PROTOCOL_VERSION, len(client)) + client.encode() + extra
        envelope = signed + hmac_module.new(_secret_key(secret, client), MAC_CONTEXT + hashlib.sha256(signed).digest(),
                                            hashlib.sha256).digest()
        try:
            open_envelope(envelope, {client: secret}.get)
        except ProtocolError as problem:
            assert problem.reason is ReasonCode.MALFORMED
        else:
            raise AssertionError("a truncated envelope was accepted")
