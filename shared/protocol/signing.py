"""Signed envelopes: every update carries an HMAC-SHA256 under its client's secret.

Layout (integers big-endian)::

    offset      size  field
    0           4     magic b"FVSE"
    4           2     protocol version (2)
    6           1     n: length of the signer's client id
    7           n     signer's client id (ASCII)
    7+n         4     m: length of the metadata JSON (at most 64 KiB)
    11+n        m     metadata JSON (EnvelopeMetadata)
    11+n+m      8     b: length of the body
    19+n+m      b     body (safetensors bytes, opaque here)
    19+n+m+b    32    HMAC-SHA256(secret, MAC_CONTEXT + SHA-256(every byte before it))

The hub reads only the magic, version and signer before checking the HMAC; lengths,
metadata and body are parsed after, so nothing an attacker controls is interpreted until
the signature is known good. The signer must also be the client named in the metadata
(and, when the hub passes it, the client id of the topic it arrived on), so a client
cannot submit an update as another client.

Why the MAC signs a digest: the chunks carry the SHA-256 of the whole payload anyway, so
one SHA-256 pass per side serves both. The sender hashes chunk by chunk while it
publishes (``SignedUpload``), and the hub's reassembler hands over the signed part's
digest from the pass it makes as chunks arrive (``Reassembler(trailer_size=MAC_SIZE)``),
so signing and verifying cost an HMAC of a few dozen bytes. Forging an envelope then
means finding a SHA-256 collision or the secret. ``MAC_CONTEXT`` keeps this use of the
client's secret apart from its other use (the broker password derivation).

Replays: the signature does not expire. The metadata binds federation and round, and the
hub accepts one update per client per round, so an old update replayed is refused as
WRONG_ROUND or DUPLICATE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ProtocolError, ReasonCode, SignatureError
from .identifiers import MAX_ID_LENGTH, validate_client_id
from .messages import EnvelopeMetadata
from .version import PROTOCOL_VERSION
from ..usage_error import UsageError

__all__ = [
    "ENVELOPE_MAGIC",
    "MAC_CONTEXT",
    "MAC_SIZE",
    "MAX_METADATA_BYTES",
    "MIN_SECRET_BYTES",
    "EnvelopeSigner",
    "SecretLookup",
    "VerifiedEnvelope",
    "new_client_secret",
    "open_envelope",
    "seal_envelope",
    "sign",
    "speaks_current_protocol",
]

ENVELOPE_MAGIC = b"FVSE"
MAC_SIZE = 32
# What the MAC's input starts with, before the digest: names the purpose of this HMAC.
MAC_CONTEXT = b"fedvlm envelope\x00"
MAX_METADATA_BYTES = 64 * 1024
# HMAC is only as strong as its key; 16 bytes is 128 bits. new_client_secret gives 256.
MIN_SECRET_BYTES = 16
_PREFIX = struct.Struct(">4sHB")  # magic, version, client id length
_METADATA_LENGTH = struct.Struct(">I")
_BODY_LENGTH = struct.Struct(">Q")
_SMALLEST_ENVELOPE = _PREFIX.size + 1 + _METADATA_LENGTH.size + _BODY_LENGTH.size + MAC_SIZE

SecretLookup = Callable[[str], bytes | str | None]


@dataclasses.dataclass(frozen=True)
class VerifiedEnvelope:
    """An envelope whose signature checked out; ``client_id`` is the authenticated signer."""

    client_id: str
    metadata: EnvelopeMetadata
    body: bytes


def new_client_secret() -> str:
    """A fresh random per-client secret (256 bits, URL-safe text) for the hub to issue."""
    return secrets.token_urlsafe(32)


def _secret_key(secret: bytes | str, client_id: str) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"the secret of client {client_id!r} must be bytes or str, got {type(secret).__name__}")
    if len(key) < MIN_SECRET_BYTES:
        raise UsageError(f"the secret of client {client_id!r} is {len(key)} bytes; HMAC needs at least "
                         f"{MIN_SECRET_BYTES}: issue one with new_client_secret()")  # fmt: skip
    return bytes(key)


class EnvelopeSigner:
    """Signs one envelope whose bytes the caller hashes (the sender's single pass).

    ``prefix`` is the signed part before the body; the envelope is ``prefix + body +
    mac(sha256(prefix + body))``. ``SignedUpload`` feeds those bytes through its chunk
    stream's hash, so hashing and publishing are one pass.
    """

    __slots__ = ("prefix", "envelope_size", "_key")

    def __init__(self, body_size: int, metadata: EnvelopeMetadata | Mapping[str, Any], client_id: str,
                 secret: bytes | str) -> None:  # fmt: skip
        validate_client_id(client_id)
        if not isinstance(metadata, EnvelopeMetadata):
            metadata = EnvelopeMetadata.from_dict(metadata)
        if metadata.client_id != client_id:
            raise ProtocolError(ReasonCode.CLIENT_MISMATCH,
                                f"metadata names client {metadata.client_id!r} but the envelope is signed as "
                                f"{client_id!r}; a client may only send its own updates")  # fmt: skip
        self._key = _secret_key(secret, client_id)
        metadata_json = json.dumps(metadata.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")
        if len(metadata_json) > MAX_METADATA_BYTES:
            raise ProtocolError(ReasonCode.TOO_LARGE,
                                f"metadata is {len(metadata_json)} bytes; the limit is {MAX_METADATA_BYTES}")
        client_id_bytes = client_id.encode("ascii")
        self.prefix = b"".join((
            _PREFIX.pack(ENVELOPE_MAGIC, PROTOCOL_VERSION, len(client_id_bytes)), client_id_bytes,
            _METADATA_LENGTH.pack(len(metadata_json)), metadata_json, _BODY_LENGTH.pack(body_size),
        ))  # fmt: skip
        self.envelope_size = len(self.prefix) + body_size + MAC_SIZE

    def mac(self, signed_sha256: bytes) -> bytes:
        """The MAC that ends the envelope, from the SHA-256 of ``prefix + body``."""
        return _mac(self._key, signed_sha256)


def sign(body: bytes | bytearray | memoryview, metadata: EnvelopeMetadata | Mapping[str, Any], client_id: str,
         secret: bytes | str) -> bytes:  # fmt: skip
    """Wrap ``body`` and ``metadata`` in an envelope signed as ``client_id`` with ``secret``."""
    body_view = memoryview(body).cast("B")
    signer = EnvelopeSigner(body_view.nbytes, metadata, client_id, secret)
    signed_hash = hashlib.sha256(signer.prefix)
    signed_hash.update(body_view)
    return b"".join((signer.prefix, body_view, signer.mac(signed_hash.digest())))


def seal_envelope(signed_part: bytes | bytearray | memoryview, secret: bytes | str) -> bytes:
    """The envelope whose signed part (everything before the MAC) is ``signed_part``, signed
    by the client its prefix names: byte for byte what ``sign`` made of the same body and
    metadata. A device saves an update's signed part while it publishes the update and seals
    it again to re-send it after a restart."""
    view = memoryview(signed_part).cast("B")
    if view.nbytes < _PREFIX.size:
        raise _malformed(f"{view.nbytes} bytes cannot be the signed part of an envelope")
    signer = _signer_from_prefix(view, view.nbytes + MAC_SIZE)
    _read_signed_part(view, signer, signed_end=view.nbytes)  # every length must fit: nothing else is sealed
    return b"".join((view, _mac(_secret_key(secret, signer), hashlib.sha256(view).digest())))


def _mac(key: bytes, signed_sha256: bytes) -> bytes:
    return hmac.new(key, MAC_CONTEXT + signed_sha256, hashlib.sha256).digest()


def open_envelope(data: bytes | bytearray | memoryview, secret_lookup: SecretLookup, *,
                  expected_client_id: str | None = None, signed_sha256: bytes | None = None) -> VerifiedEnvelope:
    """Authenticate an envelope, then parse it.

    ``secret_lookup(client_id)`` returns that client's secret, or None for a client the hub
    does not know. ``expected_client_id`` (the client id of the topic the envelope came on)
    must match the signer when given. ``signed_sha256`` is the SHA-256 of ``data`` without
    its last ``MAC_SIZE`` bytes when the caller already has it (``CompletedMessage.head_sha256``
    from a ``Reassembler(trailer_size=MAC_SIZE)``, computed over these very bytes);
    otherwise it is computed here. Raises ``SignatureError`` (UNKNOWN_CLIENT,
    BAD_SIGNATURE, CLIENT_MISMATCH) or ``ProtocolError`` (MALFORMED, UNSUPPORTED_VERSION).
    A secret from ``secret_lookup`` shorter than MIN_SECRET_BYTES is a hub configuration
    error and raises ValueError.
    """
    view = memoryview(data).cast("B")
    signer = _read_signer(view)
    secret = secret_lookup(signer)
    if secret is None:
        raise SignatureError(ReasonCode.UNKNOWN_CLIENT,
                             f"envelope signed by {signer!r}, a client this hub has no secret for; "
                             "register the client with the hub first (or it was revoked)", sender=signer)  # fmt: skip
    key = _secret_key(secret, signer)
    if signed_sha256 is None:
        signed_sha256 = hashlib.sha256(view[:-MAC_SIZE]).digest()
    elif not isinstance(signed_sha256, (bytes, bytearray)) or len(signed_sha256) != hashlib.sha256().digest_size:
        raise ValueError(f"signed_sha256 must be a 32-byte SHA-256 digest, got {signed_sha256!r}")
    if not hmac.compare_digest(_mac(key, bytes(signed_sha256)), view[-MAC_SIZE:]):
        raise SignatureError(ReasonCode.BAD_SIGNATURE,
                             f"envelope from {signer!r} fails its HMAC check: it was altered in transit or signed "
                             "with another secret (re-register the client if its secret was rotated)",
                             sender=signer)  # fmt: skip
    if expected_client_id is not None and signer != expected_client_id:
        raise SignatureError(ReasonCode.CLIENT_MISMATCH,
                             f"envelope signed by {signer!r} arrived on the topic of client {expected_client_id!r}",
                             sender=signer)  # fmt: skip
    metadata, body = _read_signed_part(view, signer)
    if metadata.client_id != signer:
        raise SignatureError(ReasonCode.CLIENT_MISMATCH,
                             f"envelope signed by {signer!r} claims in its metadata to come from "
                             f"{metadata.client_id!r}", sender=signer)  # fmt: skip
    return VerifiedEnvelope(client_id=signer, metadata=metadata, body=body)


def speaks_current_protocol(envelope: bytes | bytearray | memoryview) -> bool:
    """Whether ``envelope`` is an envelope of this protocol version (a device checks an
    update it saved before an upgrade; nothing here verifies it)."""
    view = memoryview(envelope).cast("B")
    if view.nbytes < _PREFIX.size:
        return False
    magic, version, _ = _PREFIX.unpack_from(view)
    return magic == ENVELOPE_MAGIC and version == PROTOCOL_VERSION


def _malformed(text: str, signer: str | None = None) -> ProtocolError:
    return ProtocolError(ReasonCode.MALFORMED, f"malformed envelope: {text}", sender=signer)


def _read_signer(view: memoryview) -> str:
    """The unauthenticated prefix: just enough to know whose secret to check against."""
    if view.nbytes < _SMALLEST_ENVELOPE:
        raise _malformed(f"{view.nbytes} bytes is shorter than the smallest possible envelope ({_SMALLEST_ENVELOPE})")
    return _signer_from_prefix(view, view.nbytes)


def _signer_from_prefix(head: memoryview, total_size: int) -> str:
    """The signer id from an envelope's first bytes (``head``) of ``total_size`` in all."""
    magic, version, id_length = _PREFIX.unpack_from(head)
    if magic != ENVELOPE_MAGIC:
        raise _malformed(f"starts with {magic!r}, not {ENVELOPE_MAGIC!r}; updates must be wrapped with "
                         "fedvlm.shared.protocol.sign before they are sent")  # fmt: skip
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION,
                            f"envelope uses protocol version {version}; this FedVLM speaks version "
                            f"{PROTOCOL_VERSION}, so upgrade whichever side is older")  # fmt: skip
    if not 1 <= id_length <= MAX_ID_LENGTH:
        raise _malformed(f"signer id length {id_length} is outside 1..{MAX_ID_LENGTH}")
    raw_id = bytes(head[_PREFIX.size:_PREFIX.size + id_length])
    if len(raw_id) != id_length or total_size < _PREFIX.size + id_length + MAC_SIZE:
        raise _malformed(f"{total_size} bytes cannot hold a {id_length}-character signer id and a signature")
    try:
        return validate_client_id(raw_id.decode("ascii"))
    except (UnicodeDecodeError, ProtocolError):
        raise _malformed(f"signer id {raw_id!r} is not a valid client id") from None


def _read_signed_part(view: memoryview, signer: str, *, signed_end: int | None = None
                      ) -> tuple[EnvelopeMetadata, bytes]:  # fmt: skip
    """Lengths, metadata and body: parsed only after the HMAC verified, and still checked
    because a client with a valid secret may run buggy code. ``signed_end``: where the
    signed part ends (default: before the MAC that ends ``view``)."""
    offset = _PREFIX.size + len(signer)
    end = view.nbytes - MAC_SIZE if signed_end is None else signed_end
    if offset + _METADATA_LENGTH.size + _BODY_LENGTH.size > end:
        raise _malformed(f"{view.nbytes} bytes cannot hold the length fields after signer {signer!r}", signer)
    (metadata_length,) = _METADATA_LENGTH.unpack_from(view, offset)
    offset += _METADATA_LENGTH.size
    if metadata_length > MAX_METADATA_BYTES or offset + metadata_length + _BODY_LENGTH.size > end:
        raise _malformed(f"metadata length {metadata_length} does not fit the envelope", signer)
    try:
        metadata_obj = json.loads(bytes(view[offset:offset + metadata_length]))
    except (UnicodeDecodeError, ValueError) as error:
        raise _malformed(f"metadata is not valid UTF-8 JSON: {error}", signer) from None
    try:
        metadata = EnvelopeMetadata.from_dict(metadata_obj)
    except ProtocolError as error:
        raise _malformed(f"metadata: {error}", signer) from None
    offset += metadata_length
    (body_length,) = _BODY_LENGTH.unpack_from(view, offset)
    offset += _BODY_LENGTH.size
    if offset + body_length != end:
        raise _malformed(f"body length {body_length} disagrees with the {end - offset} bytes present", signer)
    return metadata, bytes(view[offset:end])
