"""Errors of the wire protocol, each with a machine-readable reason code.

A receiver never half-applies a message: it either gets a complete, verified message or
a ``ProtocolError`` whose ``reason`` says why the message was dropped. The same codes
travel back to clients in ``Ack.reason_code``, so a device can tell "resend" from "you
are not part of this round".
"""

from __future__ import annotations

import enum

__all__ = ["ReasonCode", "ProtocolError", "SignatureError"]


class ReasonCode(str, enum.Enum):
    """Why a message was accepted, refused or dropped. The value is what goes on the wire.

    Adding a code is a protocol change: an older peer cannot parse an ``Ack`` that carries
    a code it does not know.
    """

    ACCEPTED = "accepted"

    # Framing and reassembly (chunks.py)
    TRUNCATED_HEADER = "truncated_header"  # fewer bytes than a header needs
    MALFORMED = "malformed"  # bytes or JSON that do not follow the format
    UNSUPPORTED_VERSION = "unsupported_version"  # another protocol version
    TOO_LARGE = "too_large"  # declares more bytes than the receiver accepts
    INCONSISTENT = "inconsistent"  # header contradicts itself or earlier chunks
    CORRUPT = "corrupt"  # reassembled bytes fail the SHA-256 check
    EXPIRED = "expired"  # not complete before the reassembly timeout
    OVERLOADED = "overloaded"  # receiver's pending-message limits are full

    # Signed envelope (signing.py)
    UNKNOWN_CLIENT = "unknown_client"  # no secret registered for the signer
    BAD_SIGNATURE = "bad_signature"  # HMAC does not match: tampered or wrong secret
    CLIENT_MISMATCH = "client_mismatch"  # signer differs from metadata or topic

    # Hub decisions about a verified update (sent in Ack)
    WRONG_FEDERATION = "wrong_federation"
    WRONG_ROUND = "wrong_round"  # not the round the hub is collecting
    NOT_SELECTED = "not_selected"  # client is not among this round's selected clients
    LATE = "late"  # round deadline passed or round already closed
    DUPLICATE = "duplicate"  # an update from this client was already accepted this round
    INCOMPATIBLE = "incompatible"  # strategy, base fingerprint or LoRA config differ
    INVALID_UPDATE = "invalid_update"  # tensors fail validation (names, shapes, NaN/Inf)
    HUB_ERROR = "hub_error"  # the hub failed; the client may retry


class ProtocolError(ValueError):
    """A message (or one chunk of it) was refused; ``reason`` says why.

    ``sender`` and ``message_id`` are filled in when known, so the receiver can log the
    drop and acknowledge it to the right client.
    """

    def __init__(self, reason: ReasonCode, message: str, *, sender: str | None = None,
                 message_id: bytes | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.reason = ReasonCode(reason)
        self.sender = sender
        self.message_id = message_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value}: {self.args[0]!r})"


class SignatureError(ProtocolError):
    """An envelope whose signer could not be authenticated: unknown client, bad HMAC, or a
    signer that claims to be someone else. Never process such a message's contents."""
