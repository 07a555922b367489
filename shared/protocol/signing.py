"""Signed envelopes: every update carries an HMAC-SHA256 under its client's secret.

Layout (integers big-endian)::

    offset      size  field
    0           4     magic b"FVSE"
    4           2     protocol version (1)
    6           1     n: length of the signer's client id
    7           n     signer's client id (ASCII)
    7+n         4     m: length of the metadata JSON (at most 64 KiB)
    11+n        m     metadata JSON (EnvelopeMetadata)
    11+n+m      8     b: length of the body
    19+n+m      b     body (safetensors bytes, opaque here)
    19+n+m+b    32    HMAC-SHA256(secret, every byte before it)

The hub reads only the magic, version and signer before checking the HMAC; lengths,
metadata and body are parsed after, so nothing an attacker controls is interpreted until
the signature is known good. The signer must also be the client named in the metadata
(and, when the hub passes it, the client id of the topic it arrived on), so a client
cannot submit an update as another client.

Cost: the HMAC is the protocol's one full pass over the bytes beyond the chunks' SHA-256.
``sign_for_sending`` computes the two on two cores at once, and the hub computes the HMAC
while the chunks arrive (``EnvelopeMacObserver`` rides on the reassembler's hashing pass),
so verifying a complete envelope costs no second pass.

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
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ProtocolError, ReasonCode, SignatureError
from .identifiers import MAX_ID_LENGTH, validate_client_id
from .messages import EnvelopeMetadata
from .version import PROTOCOL_VERSION
from ..usage_error import UsageError

__all__ = [
    "ENVELOPE_MAGIC",
    "MAC_SIZE",
    "MAX_METADATA_BYTES",
    "MIN_SECRET_BYTES",
    "SecretLookup",
    "EnvelopeMacObserver",
    "VerifiedEnvelope",
    "envelope_mac_observer",
    "new_client_secret",
    "open_envelope",
    "sign",
    "sign_for_sending",
]

ENVELOPE_MAGIC = b"FVSE"
MAC_SIZE = 32
MAX_METADATA_BYTES = 64 * 1024
# HMAC is only as strong as its key; 16 bytes is 128 bits. new_client_secret gives 256.
MIN_SECRET_BYTES = 16
_PREFIX = struct.Struct(">4sHB")  # magic, version, client id length
_METADATA_LENGTH = struct.Struct(">I")
_BODY_LENGTH = struct.Struct(">Q")
_SMALLEST_ENVELOPE = _PREFIX.size + 1 + _METADATA_LENGTH.size + _BODY_LENGTH.size + MAC_SIZE
# Below this a second thread costs more than the hash it would take off the critical path.
_PARALLEL_HASH_MIN_BYTES = 1 << 20

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


def sign(body: bytes | bytearray | memoryview, metadata: EnvelopeMetadata | Mapping[str, Any], client_id: str,
         secret: bytes | str) -> bytes:  # fmt: skip
    """Wrap ``body`` and ``metadata`` in an envelope signed as ``client_id`` with ``secret``."""
    envelope, _ = _sign(body, metadata, client_id, secret, with_sha256=False)
    return envelope


def sign_for_sending(body: bytes | bytearray | memoryview, metadata: EnvelopeMetadata | Mapping[str, Any],
                     client_id: str, secret: bytes | str) -> tuple[bytes, bytes]:  # fmt: skip
    """``sign``, plus the envelope's SHA-256 for ``split_payload(..., sha256=...)``.

    The chunk header needs the whole payload's SHA-256 before the first chunk can go out;
    computing it while the HMAC is computed (hashlib releases the GIL on large buffers)
    takes one of the sender's two full passes off the critical path.
    """
    envelope, digest = _sign(body, metadata, client_id, secret, with_sha256=True)
    assert digest is not None
    return envelope, digest


def _sign(body: bytes | bytearray | memoryview, metadata: EnvelopeMetadata | Mapping[str, Any], client_id: str,
          secret: bytes | str, *, with_sha256: bool) -> tuple[bytes, bytes | None]:  # fmt: skip
    validate_client_id(client_id)
    if not isinstance(metadata, EnvelopeMetadata):
        metadata = EnvelopeMetadata.from_dict(metadata)
    if metadata.client_id != client_id:
        raise ProtocolError(ReasonCode.CLIENT_MISMATCH,
                            f"metadata names client {metadata.client_id!r} but the envelope is signed as "
                            f"{client_id!r}; a client may only send its own updates")  # fmt: skip
    key = _secret_key(secret, client_id)
    metadata_json = json.dumps(metadata.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(metadata_json) > MAX_METADATA_BYTES:
        raise ProtocolError(ReasonCode.TOO_LARGE,
                            f"metadata is {len(metadata_json)} bytes; the limit is {MAX_METADATA_BYTES}")
    body_view = memoryview(body).cast("B")
    client_id_bytes = client_id.encode("ascii")
    signed_prefix = b"".join((
        _PREFIX.pack(ENVELOPE_MAGIC, PROTOCOL_VERSION, len(client_id_bytes)), client_id_bytes,
        _METADATA_LENGTH.pack(len(metadata_json)), metadata_json, _BODY_LENGTH.pack(body_view.nbytes),
    ))  # fmt: skip
    payload_hash = hashlib.sha256(signed_prefix) if with_sha256 else None
    helper = None
    if payload_hash is not None:
        if body_view.nbytes >= _PARALLEL_HASH_MIN_BYTES:
            helper = threading.Thread(target=payload_hash.update, args=(body_view,), name="fedvlm-sha256")
            helper.start()
        else:
            payload_hash.update(body_view)
    mac = hmac.new(key, signed_prefix, hashlib.sha256)
    mac.update(body_view)
    mac_bytes = mac.digest()
    if helper is not None:
        helper.join()
    if payload_hash is not None:
        payload_hash.update(mac_bytes)  # the envelope ends with its MAC; the chunk hash covers it
    return b"".join((signed_prefix, body_view, mac_bytes)), (payload_hash.digest() if payload_hash else None)


def open_envelope(data: bytes | bytearray | memoryview, secret_lookup: SecretLookup, *,
                  expected_client_id: str | None = None,
                  streamed_mac: EnvelopeMacObserver | None = None) -> VerifiedEnvelope:  # fmt: skip
    """Authenticate an envelope, then parse it.

    ``secret_lookup(client_id)`` returns that client's secret, or None for a client the hub
    does not know. ``expected_client_id`` (the client id of the topic the envelope came on)
    must match the signer when given. ``streamed_mac`` is the observer that saw ``data``
    arrive (``CompletedMessage.observer``); its MAC is used when it was computed under the
    secret the lookup returns now, otherwise the MAC is computed here. Raises ``SignatureError`` (UNKNOWN_CLIENT,
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
    expected_mac = streamed_mac.mac_for(signer, key, view.nbytes) if streamed_mac is not None else None
    if expected_mac is None:
        expected_mac = hmac.new(key, view[:-MAC_SIZE], hashlib.sha256).digest()
    if not hmac.compare_digest(expected_mac, view[-MAC_SIZE:]):
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


class EnvelopeMacObserver:
    """Computes an envelope's HMAC while its chunks arrive (a chunks ``PayloadObserver``).

    It reads the signer from the first bytes, looks up that client's secret once, and feeds
    every byte but the trailing MAC into an HMAC. It never raises and never judges: an
    unknown signer or a malformed prefix leave it without a MAC, and ``open_envelope`` then
    computes and reports as it always does.
    """

    __slots__ = ("_lookup", "_total_size", "_head", "_seen", "_gave_up", "_signer", "_key", "_mac")

    def __init__(self, secret_lookup: SecretLookup, total_size: int) -> None:
        self._lookup = secret_lookup
        self._total_size = total_size
        self._head = bytearray()  # the first bytes, kept until the signer id can be read
        self._seen = 0
        self._gave_up = total_size < _SMALLEST_ENVELOPE
        self._signer: str | None = None
        self._key: bytes | None = None
        self._mac: Any = None

    def update(self, data: memoryview) -> None:
        offset = self._seen  # payload offset of data[0]
        self._seen += data.nbytes
        signed_end = self._total_size - MAC_SIZE
        if self._mac is None:
            if self._gave_up:
                return
            taken = data[:max(0, _PREFIX.size + MAX_ID_LENGTH - len(self._head))]
            self._head += taken
            if not self._know_signer():
                return
            self._mac = hmac.new(self._key, self._head[:signed_end], hashlib.sha256)
            data, offset = data[len(taken):], offset + len(taken)
        if offset < signed_end:
            self._mac.update(data[:signed_end - offset])

    def _know_signer(self) -> bool:
        """True once the signer and its key are known; gives up for good on a bad prefix."""
        if len(self._head) < _PREFIX.size:
            return False
        id_length = self._head[_PREFIX.size - 1]
        if len(self._head) < _PREFIX.size + min(id_length, MAX_ID_LENGTH):
            return False  # the id is still on its way
        try:
            signer = _signer_from_prefix(memoryview(self._head), self._total_size)
            secret = self._lookup(signer)
            key = _secret_key(secret, signer) if secret is not None else None
        except Exception:  # noqa: BLE001 - never judge here: open_envelope reports it properly
            key = None
        if key is None:
            self._gave_up = True
            return False
        self._signer, self._key = signer, key
        return True

    def mac_for(self, signer: str, key: bytes, total_size: int) -> bytes | None:
        """The HMAC, if it covers all ``total_size - MAC_SIZE`` signed bytes under ``key``."""
        if self._mac is None or signer != self._signer or key != self._key:
            return None
        if total_size != self._total_size or self._seen != total_size:
            return None
        return self._mac.digest()


def envelope_mac_observer(secret_lookup: SecretLookup) -> Callable[[str, Any], EnvelopeMacObserver]:
    """An ``observe`` factory for ``Reassembler`` that computes each update's HMAC as it arrives."""

    def observe(_sender: str, header: Any) -> EnvelopeMacObserver:
        return EnvelopeMacObserver(secret_lookup, header.total_size)

    return observe


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


def _read_signed_part(view: memoryview, signer: str) -> tuple[EnvelopeMetadata, bytes]:
    """Lengths, metadata and body: parsed only after the HMAC verified, and still checked
    because a client with a valid secret may run buggy code."""
    offset = _PREFIX.size + len(signer)
    end = view.nbytes - MAC_SIZE
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
