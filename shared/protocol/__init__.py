"""FedVLM's wire protocol, independent of any MQTT library.

- ``topics``: every topic of a federation, with its QoS and retain flag, and parsing.
- ``chunks``: the chunk format; payloads split into broker-sized chunks.
- ``reassembly``: chunks back into payloads, within bounds of memory and time.
- ``signing``: HMAC-SHA256 envelopes that authenticate every update's sender.
- ``sending``: an update signed and chunked in one pass while it is published.
- ``messages``: JSON control messages (hub state, manifest, presence, acks).
- ``errors``: ``ProtocolError`` and the ``ReasonCode`` every refusal carries.

The transport (paho-mqtt in the edge SDK and the hub) publishes and receives bytes; this
package decides what those bytes and topics mean. See docs/protocol.md for the layouts.
"""

from .backoff import RETRYABLE_AFTER_HINT, RetryBackoff
from .chunks import (
    CHUNK_HEADER_SIZE,
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SHA256_NOT_STATED,
    ChunkHeader,
    ChunkStream,
    expected_chunk_count,
    new_message_id,
    parse_chunk_header,
    split_payload,
)
from .errors import ProtocolError, ReasonCode, SignatureError
from .identifiers import MAX_ID_LENGTH, validate_client_id, validate_federation_id, validate_share_group
from .messages import (
    MAX_CONTROL_MESSAGE_BYTES,
    Ack,
    Announcement,
    EnvelopeMetadata,
    GlobalManifest,
    HubState,
    MessageKind,
    Presence,
    RoundPhase,
    Selection,
)
from .reassembly import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_MESSAGES,
    DEFAULT_MAX_PENDING_PER_SENDER,
    DEFAULT_TIMEOUT_S,
    CompletedMessage,
    DroppedMessage,
    Reassembler,
)
from .sending import SignedUpload
from .signing import (
    MAC_CONTEXT,
    MAC_SIZE,
    MIN_SECRET_BYTES,
    EnvelopeSigner,
    SecretLookup,
    VerifiedEnvelope,
    new_client_secret,
    open_envelope,
    seal_envelope,
    sign,
    speaks_current_protocol,
)
from .topics import DELIVERY, TOPIC_ROOT, ClientPermissions, Delivery, ParsedTopic, TopicKind, Topics, parse_topic
from .version import PROTOCOL_VERSION, TOPIC_TREE_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "TOPIC_TREE_VERSION",
    # errors
    "ProtocolError",
    "ReasonCode",
    "SignatureError",
    # identifiers
    "MAX_ID_LENGTH",
    "validate_client_id",
    "validate_federation_id",
    "validate_share_group",
    # topics
    "DELIVERY",
    "TOPIC_ROOT",
    "ClientPermissions",
    "Delivery",
    "ParsedTopic",
    "TopicKind",
    "Topics",
    "parse_topic",
    # chunks
    "CHUNK_HEADER_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PENDING_BYTES",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "DEFAULT_TIMEOUT_S",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "SHA256_NOT_STATED",
    "ChunkHeader",
    "ChunkStream",
    "expected_chunk_count",
    "new_message_id",
    "parse_chunk_header",
    "split_payload",
    # reassembly
    "DEFAULT_MAX_PENDING_PER_SENDER",
    "CompletedMessage",
    "DroppedMessage",
    "Reassembler",
    # messages
    "MAX_CONTROL_MESSAGE_BYTES",
    "Ack",
    "Selection",
    "RetryBackoff",
    "RETRYABLE_AFTER_HINT",
    "Announcement",
    "EnvelopeMetadata",
    "GlobalManifest",
    "HubState",
    "MessageKind",
    "Presence",
    "RoundPhase",
    # signing
    "MAC_CONTEXT",
    "MAC_SIZE",
    "MIN_SECRET_BYTES",
    "EnvelopeSigner",
    "SecretLookup",
    "VerifiedEnvelope",
    "new_client_secret",
    "open_envelope",
    "seal_envelope",
    "sign",
    "speaks_current_protocol",
    # sending
    "SignedUpload",
]
