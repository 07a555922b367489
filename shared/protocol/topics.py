"""Every MQTT topic of a federation, built and parsed in one place.

All topics live under ``fedvlm/v1/<federation>/``::

    hub/state                           hub → all      retained  HubState (hub's last will: offline)
    global/manifest                     hub → all      retained  GlobalManifest of the latest version
    global/<version>/chunk/<index>      hub → all      retained  chunks of that version's payload
    clients/<client_id>/announce        client → hub   retained  Announcement (last will: offline)
    clients/<client_id>/ack             hub → client             Ack of one update
    updates/<client_id>/<message_id>    client → hub             chunks of one signed update

Why this shape:

- The client id is a topic level of everything a client publishes, so a broker ACL such
  as mosquitto's ``pattern write fedvlm/v1/+/updates/%u/#`` lets each client publish only
  as itself (``client_permissions`` lists the rules).
- An update's message id is its own topic level, so all chunks of one update share one
  topic. Hub workers can then split updates with an MQTT 5 shared subscription
  (``$share/<group>/fedvlm/v1/<fed>/updates/+/+``) on a broker that keeps one topic on
  one member (EMQX ``hash_topic``/``hash_clientid``); a round-robin split would scatter
  the chunks of one update over several workers.
- Global chunks are retained per version, so a device that joins late reads the manifest
  and then fetches exactly that version's chunks, even while the hub publishes the next.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from .errors import ProtocolError, ReasonCode
from .identifiers import validate_client_id, validate_federation_id, validate_share_group
from .version import TOPIC_TREE_VERSION

__all__ = [
    "TOPIC_ROOT",
    "TopicKind",
    "Delivery",
    "DELIVERY",
    "ParsedTopic",
    "ClientPermissions",
    "Topics",
    "parse_topic",
]

TOPIC_ROOT = f"fedvlm/v{TOPIC_TREE_VERSION}"
_MESSAGE_ID_HEX = re.compile(r"[0-9a-f]{32}")
_CANONICAL_UINT = re.compile(r"0|[1-9][0-9]{0,18}")  # one spelling per number, so one topic per chunk


class TopicKind(str, enum.Enum):
    HUB_STATE = "hub_state"
    GLOBAL_MANIFEST = "global_manifest"
    GLOBAL_CHUNK = "global_chunk"
    CLIENT_ANNOUNCE = "client_announce"
    CLIENT_ACK = "client_ack"
    CLIENT_SELECTION = "client_selection"
    UPDATE = "update"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """How to publish on a topic: MQTT QoS level and retain flag."""

    qos: int
    retain: bool


# QoS 1 everywhere: every message matters and receivers are idempotent (chunk duplicates
# are ignored, state messages are replaced), so QoS 2's extra round trip buys nothing.
DELIVERY: dict[TopicKind, Delivery] = {
    TopicKind.HUB_STATE: Delivery(qos=1, retain=True),
    TopicKind.GLOBAL_MANIFEST: Delivery(qos=1, retain=True),
    TopicKind.GLOBAL_CHUNK: Delivery(qos=1, retain=True),
    TopicKind.CLIENT_ANNOUNCE: Delivery(qos=1, retain=True),
    TopicKind.CLIENT_ACK: Delivery(qos=1, retain=False),
    # Retained: a device that connects after its round opened still learns it was picked.
    TopicKind.CLIENT_SELECTION: Delivery(qos=1, retain=True),
    TopicKind.UPDATE: Delivery(qos=1, retain=False),
}


@dataclasses.dataclass(frozen=True)
class ParsedTopic:
    """A topic taken apart. Fields that the kind does not have are None."""

    kind: TopicKind
    federation: str
    client_id: str | None = None
    version: int | None = None
    chunk_index: int | None = None
    message_id: bytes | None = None


@dataclasses.dataclass(frozen=True)
class ClientPermissions:
    """Broker ACL topic patterns for one client (patterns may contain MQTT wildcards)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _check_uint(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(ReasonCode.MALFORMED, f"{what} must be a non-negative integer, got {value!r}")
    return value


def _check_message_id(message_id: object) -> bytes:
    if not isinstance(message_id, (bytes, bytearray)) or len(message_id) != 16:
        raise ProtocolError(ReasonCode.MALFORMED,
                            f"message id must be 16 bytes (as in the chunk header), got {message_id!r}")
    return bytes(message_id)


class Topics:
    """Topic names and subscription filters of one federation."""

    def __init__(self, federation: str) -> None:
        self.federation = validate_federation_id(federation)
        self.prefix = f"{TOPIC_ROOT}/{self.federation}"

    def __repr__(self) -> str:
        return f"Topics({self.federation!r})"

    # ------------------------------------------------------------------ hub → all
    def hub_state(self) -> str:
        return f"{self.prefix}/hub/state"

    def global_manifest(self) -> str:
        return f"{self.prefix}/global/manifest"

    def global_chunk(self, version: int, index: int) -> str:
        _check_uint(version, "global version")
        _check_uint(index, "chunk index")
        return f"{self.prefix}/global/{version}/chunk/{index}"

    def global_chunks_filter(self, version: int) -> str:
        """Subscribe to this to receive every chunk of one global version."""
        _check_uint(version, "global version")
        return f"{self.prefix}/global/{version}/chunk/+"

    # ------------------------------------------------------------------ client ↔ hub
    def client_announce(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{validate_client_id(client_id)}/announce"

    def client_announcements_filter(self) -> str:
        return f"{self.prefix}/clients/+/announce"

    def client_ack(self, client_id: str) -> str:
        return f"{self.prefix}/clients/{validate_client_id(client_id)}/ack"

    def client_selection(self, client_id: str) -> str:
        """The hub's retained word to one device that it is selected (protocol 3)."""
        return f"{self.prefix}/clients/{validate_client_id(client_id)}/selection"

    def update(self, client_id: str, message_id: bytes) -> str:
        """Topic for every chunk of one update; ``message_id`` is the chunks' header id."""
        return f"{self.prefix}/updates/{validate_client_id(client_id)}/{_check_message_id(message_id).hex()}"

    def updates_filter(self) -> str:
        """Filter for one hub process receiving every client's updates."""
        return f"{self.prefix}/updates/+/+"

    def shared_updates_filter(self, group: str) -> str:
        """MQTT 5 shared subscription spreading updates over the hub workers of ``group``.

        Needs a broker strategy that keeps one topic on one member (see module docstring).
        """
        return f"$share/{validate_share_group(group)}/{self.updates_filter()}"

    def worker_relay(self, worker: int, client_id: str, message_id: bytes) -> str:
        """Where a hub worker hands a chunk of a multi-chunk update to the worker that owns it.

        mosquitto spreads a shared subscription's messages round robin, so the chunks of
        one update reach several workers; each relays the chunks it does not own.
        """
        _check_uint(worker, "worker index")
        return (f"{self.prefix}/hub/workers/{worker}/{validate_client_id(client_id)}/"
                f"{_check_message_id(message_id).hex()}")  # fmt: skip

    def worker_relay_filter(self, worker: int) -> str:
        _check_uint(worker, "worker index")
        return f"{self.prefix}/hub/workers/{worker}/+/+"

    def parse_worker_relay(self, topic: str) -> ParsedTopic:
        """A relayed chunk's topic as the update topic it was first published on (``kind`` UPDATE)."""
        head, _, rest = topic.partition("/hub/workers/")
        parts = rest.split("/")
        if head != self.prefix or len(parts) != 3 or not _CANONICAL_UINT.fullmatch(parts[0]):
            raise _topic_error(topic, f"not a worker relay topic under '{self.prefix}/hub/workers/'")
        return self.parse(f"{self.prefix}/updates/{parts[1]}/{parts[2]}")

    # ------------------------------------------------------------------ access control
    def client_permissions(self, client_id: str) -> ClientPermissions:
        """The least a client needs: publish as itself, read hub broadcasts and its acks."""
        validate_client_id(client_id)
        return ClientPermissions(
            publish=(self.client_announce(client_id), f"{self.prefix}/updates/{client_id}/+"),
            subscribe=(self.hub_state(), self.global_manifest(), f"{self.prefix}/global/+/chunk/+",
                       self.client_ack(client_id), self.client_selection(client_id)),  # fmt: skip
        )

    def worker_permissions(self, worker: int) -> ClientPermissions:
        """What hub worker ``worker`` needs: read updates (its share, through ``$share/...``) and
        the chunks relayed to it, relay chunks to the other workers, acknowledge devices."""
        _check_uint(worker, "worker index")
        return ClientPermissions(publish=(f"{self.prefix}/clients/+/ack", f"{self.prefix}/hub/workers/+/+/+"),
                                 subscribe=(self.updates_filter(), self.worker_relay_filter(worker)))

    def hub_publisher_permissions(self) -> ClientPermissions:
        """What the hub's second connection (its own publishes) needs: the state, global
        versions, and each device's selection and acks; it subscribes to nothing. (A broker's
        per-client pattern rules apply to every account: broker-config denies this one, and
        the workers', the device topics of their own names.)"""
        return ClientPermissions(publish=(self.hub_state(), f"{self.prefix}/global/#", f"{self.prefix}/clients/+/ack",
                                          f"{self.prefix}/clients/+/selection"), subscribe=())  # fmt: skip

    def hub_permissions(self) -> ClientPermissions:
        """The hub publishes and subscribes anywhere in its federation."""
        everything = (f"{self.prefix}/#",)
        return ClientPermissions(publish=everything, subscribe=everything)

    # ------------------------------------------------------------------ parsing
    def parse(self, topic: str) -> ParsedTopic:
        """Like ``parse_topic``, and also refuse topics of another federation."""
        parsed = parse_topic(topic)
        if parsed.federation != self.federation:
            raise ProtocolError(ReasonCode.WRONG_FEDERATION,
                                f"topic {topic!r} belongs to federation {parsed.federation!r}, not {self.federation!r}")
        return parsed


def _topic_error(topic: str, problem: str) -> ProtocolError:
    return ProtocolError(ReasonCode.MALFORMED, f"topic {topic!r} is not a FedVLM topic: {problem}")


def _parse_uint(topic: str, text: str, what: str) -> int:
    if not _CANONICAL_UINT.fullmatch(text):
        raise _topic_error(topic, f"{what} {text!r} is not a decimal number without leading zeros")
    return int(text)


def parse_topic(topic: str) -> ParsedTopic:
    """Take a received topic apart; raise ``ProtocolError`` if it is not one of ours.

    Received messages carry the plain topic, never the ``$share/<group>/`` prefix of the
    subscription they matched, so there is nothing to strip.
    """
    if not isinstance(topic, str):
        raise ProtocolError(ReasonCode.MALFORMED, f"topic must be a string, got {type(topic).__name__}")
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != "fedvlm":
        raise _topic_error(topic, f"it does not start with '{TOPIC_ROOT}/<federation>/'")
    if levels[1] != f"v{TOPIC_TREE_VERSION}":
        raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION,
                            f"topic {topic!r} uses topic tree {levels[1]!r}; this FedVLM uses v{TOPIC_TREE_VERSION}")
    try:
        federation = validate_federation_id(levels[2])
    except ProtocolError as error:
        raise _topic_error(topic, str(error)) from None
    rest = levels[3:]
    match rest:
        case ["hub", "state"]:
            return ParsedTopic(TopicKind.HUB_STATE, federation)
        case ["global", "manifest"]:
            return ParsedTopic(TopicKind.GLOBAL_MANIFEST, federation)
        case ["global", version, "chunk", index]:
            return ParsedTopic(TopicKind.GLOBAL_CHUNK, federation,
                               version=_parse_uint(topic, version, "global version"),
                               chunk_index=_parse_uint(topic, index, "chunk index"))  # fmt: skip
        case ["clients", client_id, "announce" | "ack" | "selection" as leaf]:
            kind = {"announce": TopicKind.CLIENT_ANNOUNCE, "ack": TopicKind.CLIENT_ACK,
                    "selection": TopicKind.CLIENT_SELECTION}[leaf]
            return ParsedTopic(kind, federation, client_id=_parse_client_id(topic, client_id))
        case ["updates", client_id, message_id]:
            if not _MESSAGE_ID_HEX.fullmatch(message_id):
                raise _topic_error(topic, f"message id {message_id!r} is not 32 lowercase hex digits")
            return ParsedTopic(TopicKind.UPDATE, federation, client_id=_parse_client_id(topic, client_id),
                               message_id=bytes.fromhex(message_id))  # fmt: skip
    raise _topic_error(topic, f"unknown path '{'/'.join(rest)}' under '{TOPIC_ROOT}/{federation}/'")


def _parse_client_id(topic: str, client_id: str) -> str:
    try:
        return validate_client_id(client_id)
    except ProtocolError as error:
        raise _topic_error(topic, str(error)) from None
