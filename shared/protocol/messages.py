"""Small JSON control messages: hub state, global manifest, client presence, acks, and
the metadata block of a signed update.

Each is a frozen dataclass that checks its fields when built, whether by code or by
``from_json`` from network bytes, so an invalid message never exists. On the wire every
message is a UTF-8 JSON object with a ``"type"`` field naming the message, so a message
published on the wrong topic is refused instead of misread. Readers ignore fields they do
not know (a newer peer may add optional ones) and fill in defaults for optional fields
that are missing.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from . import _fields as f
from .chunks import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, expected_chunk_count
from .errors import ProtocolError, ReasonCode
from .identifiers import validate_client_id, validate_federation_id
from .version import PROTOCOL_VERSION

__all__ = [
    "MAX_CONTROL_MESSAGE_BYTES",
    "Presence",
    "RoundPhase",
    "MessageKind",
    "HubState",
    "GlobalManifest",
    "Announcement",
    "Ack",
    "Selection",
    "EnvelopeMetadata",
]

# Control messages travel unchunked, so they stay within the default chunk's 256 KiB.
MAX_CONTROL_MESSAGE_BYTES = 256 * 1024
_MAX_REASON_TEXT = 2000
# Longest wait a hub may ask of a device refused for load (Ack.retry_after_s).
MAX_RETRY_AFTER_S = 3600.0

_Message = TypeVar("_Message", bound="_ControlMessage")


class Presence(str, enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"


class RoundPhase(str, enum.Enum):
    WAITING = "waiting"  # for enough clients to open a round
    COLLECTING = "collecting"  # updates from the selected clients, until the deadline
    AGGREGATING = "aggregating"
    PUBLISHING = "publishing"  # the new global version's chunks and manifest
    DONE = "done"  # the federation ran all its rounds


class MessageKind(str, enum.Enum):
    """What a signed envelope's body is; the hub routes on it before parsing the body."""

    UPDATE = "update"  # a client's shared LoRA tensors for one round (safetensors bytes)


def _validate_id(owner: str, field: str, value: Any, validate) -> str:
    try:
        return validate(value)
    except ProtocolError as error:
        raise f.malformed(owner, field, f"is invalid: {error}") from None


class _ControlMessage:
    """JSON encoding shared by all control messages (subclasses are frozen dataclasses)."""

    MESSAGE_TYPE: ClassVar[str]

    def _set(self, name: str, value: Any) -> None:
        # Normalising a field (list -> tuple, str -> enum) of a frozen dataclass.
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The message as JSON-ready values (enums as strings, tuples as lists)."""
        return {field.name: _json_value(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[_Message], obj: Mapping[str, Any]) -> _Message:
        if not isinstance(obj, Mapping):
            raise ProtocolError(ReasonCode.MALFORMED, f"{cls.__name__} must be a JSON object, got {type(obj).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in obj:
                values[field.name] = obj[field.name]
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ProtocolError(ReasonCode.MALFORMED, f"{cls.__name__} lacks the required field {field.name!r}")
        return cls(**values)

    def to_json(self) -> bytes:
        data = json.dumps({"type": self.MESSAGE_TYPE, **self.to_dict()}, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")  # fmt: skip
        if len(data) > MAX_CONTROL_MESSAGE_BYTES:
            raise ProtocolError(ReasonCode.TOO_LARGE,
                                f"{type(self).__name__} is {len(data)} bytes of JSON, over the "
                                f"{MAX_CONTROL_MESSAGE_BYTES}-byte limit for control messages; shrink it "
                                "(e.g. select fewer clients per round)")  # fmt: skip
        return data

    @classmethod
    def from_json(cls: type[_Message], data: bytes | bytearray | str) -> _Message:
        name = cls.__name__
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise ProtocolError(ReasonCode.MALFORMED, f"{name} JSON must be bytes or str, got {type(data).__name__}")
        if len(data) > MAX_CONTROL_MESSAGE_BYTES:
            raise ProtocolError(ReasonCode.TOO_LARGE,
                                f"{name} message is {len(data)} bytes, over the {MAX_CONTROL_MESSAGE_BYTES}-byte limit")
        try:
            obj = json.loads(data, parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as error:
            raise ProtocolError(ReasonCode.MALFORMED, f"{name} message is not valid UTF-8 JSON: {error}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(ReasonCode.MALFORMED, f"{name} message must be a JSON object, got {type(obj).__name__}")
        if obj.get("type") != cls.MESSAGE_TYPE:
            raise ProtocolError(ReasonCode.MALFORMED,
                                f"expected a {cls.MESSAGE_TYPE!r} message, got type {obj.get('type')!r}; "
                                "was it published on the wrong topic?")  # fmt: skip
        return cls.from_dict(obj)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return value


@dataclasses.dataclass(frozen=True)
class HubState(_ControlMessage):
    """The hub's retained state; its last will is the same state with status offline.

    ``deadline`` (Unix time) is set while the phase is ``collecting``; ``selected_count``
    is how many devices the round selected (each selected device is told so by its own
    retained :class:`Selection`: the state does not grow with the federation);
    ``round_config`` carries what clients need to train (e.g. local steps, learning rate,
    LoRA seed, the attempt).
    """

    MESSAGE_TYPE: ClassVar[str] = "hub_state"

    federation: str
    status: Presence
    round: int
    phase: RoundPhase
    global_version: int
    selected_count: int = 0
    deadline: float | None = None
    round_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        owner = "HubState"
        _validate_id(owner, "federation", self.federation, validate_federation_id)
        self._set("status", f.check_enum(owner, "status", self.status, Presence))
        f.check_int(owner, "round", self.round)
        self._set("phase", f.check_enum(owner, "phase", self.phase, RoundPhase))
        f.check_int(owner, "global_version", self.global_version)
        f.check_int(owner, "selected_count", self.selected_count)
        if self.deadline is not None:
            self._set("deadline", f.check_timestamp(owner, "deadline", self.deadline))
        self._set("round_config", f.check_json_object(owner, "round_config", self.round_config))
        f.check_int(owner, "protocol_version", self.protocol_version, minimum=1)

    def went_offline(self) -> HubState:
        """This state marked offline: what the hub registers as its last will."""
        return dataclasses.replace(self, status=Presence.OFFLINE)


@dataclasses.dataclass(frozen=True)
class GlobalManifest(_ControlMessage):
    """Describes the latest global version, whose chunks are retained under its version.

    A client fetches ``chunk_count`` chunks, reassembles them, and checks that the payload
    has ``total_size`` bytes and SHA-256 ``payload_sha256`` before using it.
    """

    MESSAGE_TYPE: ClassVar[str] = "global_manifest"

    federation: str
    version: int
    round: int
    strategy: str
    payload_sha256: str
    total_size: int
    chunk_count: int
    chunk_size: int
    base_fingerprint: str
    lora_config_hash: str
    created_at: float

    def __post_init__(self) -> None:
        owner = "GlobalManifest"
        _validate_id(owner, "federation", self.federation, validate_federation_id)
        f.check_int(owner, "version", self.version)
        f.check_int(owner, "round", self.round)
        f.check_token(owner, "strategy", self.strategy)
        f.check_pattern(owner, "payload_sha256", self.payload_sha256, f.SHA256_HEX_PATTERN, "64 lowercase hex digits")
        f.check_int(owner, "total_size", self.total_size)
        f.check_int(owner, "chunk_count", self.chunk_count, minimum=1)
        f.check_int(owner, "chunk_size", self.chunk_size, minimum=MIN_CHUNK_SIZE)
        if self.chunk_size > MAX_CHUNK_SIZE:
            raise f.malformed(owner, "chunk_size", f"must be at most {MAX_CHUNK_SIZE}, got {self.chunk_size}")
        expected = expected_chunk_count(self.total_size, self.chunk_size)
        if self.chunk_count != expected:
            raise f.malformed(owner, "chunk_count", f"is {self.chunk_count}, but {self.total_size} bytes in chunks "
                                                    f"of {self.chunk_size} make {expected}")  # fmt: skip
        f.check_token(owner, "base_fingerprint", self.base_fingerprint)
        f.check_token(owner, "lora_config_hash", self.lora_config_hash)
        self._set("created_at", f.check_timestamp(owner, "created_at", self.created_at))


@dataclasses.dataclass(frozen=True)
class Announcement(_ControlMessage):
    """A client's retained presence; its last will is the same with status offline."""

    MESSAGE_TYPE: ClassVar[str] = "announcement"

    client_id: str
    status: Presence
    sdk_version: str
    last_round: int | None = None  # last round this client sent an update for; None if never

    def __post_init__(self) -> None:
        owner = "Announcement"
        _validate_id(owner, "client_id", self.client_id, validate_client_id)
        self._set("status", f.check_enum(owner, "status", self.status, Presence))
        f.check_token(owner, "sdk_version", self.sdk_version)
        f.check_optional_int(owner, "last_round", self.last_round)

    def went_offline(self) -> Announcement:
        """This announcement marked offline: what the client registers as its last will."""
        return dataclasses.replace(self, status=Presence.OFFLINE)


@dataclasses.dataclass(frozen=True)
class Selection(_ControlMessage):
    """The hub's word to one device that a round attempt selected it (retained, per device).

    A device takes part when its selection names the round and attempt the hub state is
    collecting; a selection of an earlier round or attempt is stale and ignored, so the hub
    never has to clear them.
    """

    MESSAGE_TYPE: ClassVar[str] = "selection"

    federation: str
    client_id: str
    round: int
    attempt: int
    deadline: float

    def __post_init__(self) -> None:
        owner = "Selection"
        _validate_id(owner, "federation", self.federation, validate_federation_id)
        _validate_id(owner, "client_id", self.client_id, validate_client_id)
        f.check_int(owner, "round", self.round, minimum=1)
        f.check_int(owner, "attempt", self.attempt, minimum=1)
        self._set("deadline", f.check_timestamp(owner, "deadline", self.deadline))

    def matches(self, state: HubState) -> bool:
        """Whether this selection is for the attempt ``state`` is collecting."""
        return (state.phase is RoundPhase.COLLECTING and state.federation == self.federation
                and state.round == self.round and state.round_config.get("attempt", 1) == self.attempt)


@dataclasses.dataclass(frozen=True)
class Ack(_ControlMessage):
    """The hub's answer to one update: accepted, or rejected with a reason.

    ``round`` and ``message_id`` (hex of the chunk header's message id) are None when the
    hub could not read them, e.g. for an update whose signature failed.
    ``retry_after_s``: with ``overloaded``, how long the device should wait before sending
    the same update again (it then adds jitter and backs off if refused again).
    """

    MESSAGE_TYPE: ClassVar[str] = "ack"

    client_id: str
    round: int | None
    message_id: str | None
    accepted: bool
    reason_code: ReasonCode
    reason_text: str = ""
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        owner = "Ack"
        _validate_id(owner, "client_id", self.client_id, validate_client_id)
        f.check_optional_int(owner, "round", self.round)
        if self.message_id is not None:
            f.check_pattern(owner, "message_id", self.message_id, f.MESSAGE_ID_HEX_PATTERN, "32 lowercase hex digits")
        f.check_bool(owner, "accepted", self.accepted)
        self._set("reason_code", f.check_enum(owner, "reason_code", self.reason_code, ReasonCode))
        if self.accepted != (self.reason_code is ReasonCode.ACCEPTED):
            raise f.malformed(owner, "reason_code", f"is {self.reason_code.value!r} but accepted is "
                                                    f"{str(self.accepted).lower()}; use 'accepted' exactly when "
                                                    "the update was accepted")  # fmt: skip
        f.check_text(owner, "reason_text", self.reason_text, max_length=_MAX_REASON_TEXT)
        if self.retry_after_s is not None:
            value = self.retry_after_s
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_RETRY_AFTER_S:
                raise f.malformed(owner, "retry_after_s", f"must be a number of seconds in 0..{MAX_RETRY_AFTER_S:g}, "
                                                          f"got {value!r}")  # fmt: skip
            self._set("retry_after_s", float(value))

    @classmethod
    def accept(cls, client_id: str, round: int, message_id: bytes) -> Ack:
        return cls(client_id, round, message_id.hex(), True, ReasonCode.ACCEPTED, "update accepted")

    @classmethod
    def reject(cls, client_id: str, round: int | None, message_id: bytes | None, reason: ReasonCode,
               text: str, *, retry_after_s: float | None = None) -> Ack:  # fmt: skip
        return cls(client_id, round, None if message_id is None else message_id.hex(), False, reason, text,
                   retry_after_s)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EnvelopeMetadata(_ControlMessage):
    """What the hub needs to route a signed update before it parses the tensors.

    The same facts are in the body's safetensors metadata; the hub checks that they agree.
    """

    MESSAGE_TYPE: ClassVar[str] = "envelope_metadata"

    federation: str
    round: int
    client_id: str
    sample_count: int  # the client's training examples: its weight in the mean
    strategy: str
    base_fingerprint: str
    lora_config_hash: str
    kind: MessageKind = MessageKind.UPDATE

    def __post_init__(self) -> None:
        owner = "EnvelopeMetadata"
        _validate_id(owner, "federation", self.federation, validate_federation_id)
        f.check_int(owner, "round", self.round)
        _validate_id(owner, "client_id", self.client_id, validate_client_id)
        f.check_int(owner, "sample_count", self.sample_count, minimum=1)
        f.check_token(owner, "strategy", self.strategy)
        f.check_token(owner, "base_fingerprint", self.base_fingerprint)
        f.check_token(owner, "lora_config_hash", self.lora_config_hash)
        self._set("kind", f.check_enum(owner, "kind", self.kind, MessageKind))
