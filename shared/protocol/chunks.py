"""Payloads split into MQTT-sized chunks, and reassembled with bounded memory and time.

Each chunk is a fixed 74-byte header followed by up to ``chunk_size`` payload bytes
(all integers big-endian)::

    offset  size  field
    0       4     magic b"FVCK"
    4       2     protocol version (1)
    6       16    message id: the same in every chunk of one payload
    22      4     chunk index, 0-based
    26      4     chunk count
    30      4     chunk size: payload bytes in every chunk but the last
    34      8     total payload size in bytes
    42      32    SHA-256 of the whole payload; in chunks before the last it may be
                  zero ("stated in the last chunk")
    74      ...   this chunk's payload bytes

Every chunk repeats the sizes, so a receiver can size and check a message from
whichever chunk arrives first, and chunks may arrive in any order or twice (QoS 1
redelivers). The digest is always in the last chunk; a sender that knows it up front
(``split_payload``) repeats it in every chunk, and a sender still producing the payload
(``ChunkStream``) leaves it zero until the last, so it can hash and publish in one pass.
``Reassembler`` is not thread-safe; feed it from one thread (paho calls its callbacks
from its network thread).

Zero-length messages on a retained chunk topic are the broker's way of saying a retained
message was deleted; transports skip them instead of feeding them here.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import secrets
import struct
import time
from collections.abc import Callable

from .errors import ProtocolError, ReasonCode
from .version import PROTOCOL_VERSION

__all__ = [
    "CHUNK_MAGIC",
    "CHUNK_HEADER_SIZE",
    "MESSAGE_ID_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "DEFAULT_MAX_PENDING_PER_SENDER",
    "DEFAULT_MAX_PENDING_BYTES",
    "DEFAULT_TIMEOUT_S",
    "ChunkHeader",
    "ChunkStream",
    "CompletedMessage",
    "DroppedMessage",
    "Reassembler",
    "SHA256_NOT_STATED",
    "expected_chunk_count",
    "new_message_id",
    "parse_chunk_header",
    "split_payload",
]

CHUNK_MAGIC = b"FVCK"
_HEADER = struct.Struct(">4sH16sIIIQ32s")
CHUNK_HEADER_SIZE = _HEADER.size  # 74
MESSAGE_ID_SIZE = 16
# The digest field of a chunk before the last whose sender does not know the digest yet.
SHA256_NOT_STATED = bytes(32)

# Header plus data of a default chunk is exactly 256 KiB, within every common broker's
# default maximum message size.
DEFAULT_CHUNK_SIZE = 256 * 1024 - CHUNK_HEADER_SIZE
# A floor on chunk size bounds the chunk count, and with it the per-message bookkeeping a
# hostile header could make the receiver allocate.
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_PENDING_MESSAGES = 64
# One sender (one client's topic) may hold only a few of those slots, so a buggy or hostile
# client cannot starve the others; an honest device sends one update at a time (the room
# left covers a few uploads abandoned by crashes within the reassembly timeout).
DEFAULT_MAX_PENDING_PER_SENDER = 8
DEFAULT_MAX_PENDING_BYTES = 1024 * 1024 * 1024
# Long enough for a large update over a slow uplink (256 MiB at ~4 Mbit/s).
DEFAULT_TIMEOUT_S = 600.0


def expected_chunk_count(total_size: int, chunk_size: int) -> int:
    """Chunks a payload of ``total_size`` bytes needs; an empty payload still sends one."""
    return max(1, -(-total_size // chunk_size))


def new_message_id() -> bytes:
    return secrets.token_bytes(MESSAGE_ID_SIZE)


@dataclasses.dataclass(frozen=True)
class ChunkHeader:
    message_id: bytes
    index: int
    count: int
    chunk_size: int
    total_size: int
    sha256: bytes

    @property
    def states_sha256(self) -> bool:
        """False for a chunk before the last that leaves the digest to the last chunk."""
        return self.sha256 != SHA256_NOT_STATED

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def differences_from(self, other: ChunkHeader) -> list[str]:
        """Whole-message fields on which two chunk headers of one message disagree (the
        digest only where both state it)."""
        differences = [f"{name} {mine!r} vs {theirs!r}" for name, mine, theirs in (
            ("chunk count", self.count, other.count),
            ("chunk size", self.chunk_size, other.chunk_size),
            ("total size", self.total_size, other.total_size),
        ) if mine != theirs]  # fmt: skip
        if self.states_sha256 and other.states_sha256 and self.sha256 != other.sha256:
            differences.append(f"SHA-256 {self.sha256.hex()!r} vs {other.sha256.hex()!r}")
        return differences

    def expected_data_size(self) -> int:
        """Payload bytes this chunk must carry, given its index."""
        if self.index < self.count - 1:
            return self.chunk_size
        return self.total_size - (self.count - 1) * self.chunk_size


@dataclasses.dataclass(frozen=True)
class CompletedMessage:
    """A reassembled payload whose SHA-256 matched its header.

    ``head_sha256`` is the SHA-256 of the payload without its last ``trailer_size`` bytes
    (the reassembler's setting), taken on the same hashing pass: for a signed envelope,
    the digest its MAC signs. None when the reassembler has no trailer size.
    """

    sender: str
    message_id: bytes
    payload: bytes
    sha256: bytes
    head_sha256: bytes | None = None


@dataclasses.dataclass(frozen=True)
class DroppedMessage:
    """A message the reassembler gave up on, reported once by ``drain_expired``."""

    sender: str
    message_id: bytes
    reason: ReasonCode
    detail: str


def split_payload(payload: bytes | bytearray | memoryview, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  message_id: bytes | None = None, sha256: bytes | None = None) -> list[bytes]:  # fmt: skip
    """Split ``payload`` into chunks, each a header plus at most ``chunk_size`` bytes.

    Every chunk states the payload's SHA-256. ``message_id`` defaults to 16 random bytes.
    Pass a fixed one to make a republish byte-identical to the first publish (the hub uses
    the first 16 bytes of the payload's SHA-256 for global versions, so retained chunks
    from two publishes never mix). ``sha256`` is the payload's digest when the caller
    already has it; a wrong one makes the receiver drop the message as CORRUPT, never
    accept other bytes. A sender still producing the payload uses ``ChunkStream``.
    """
    _check_chunk_size(chunk_size)
    message_id = _message_id_or_new(message_id)
    view = memoryview(payload).cast("B")
    count = _chunk_count(view.nbytes, chunk_size)
    if sha256 is None:
        digest = hashlib.sha256(view).digest()
    elif isinstance(sha256, (bytes, bytearray)) and len(sha256) == 32:
        digest = bytes(sha256)
    else:
        raise ValueError(f"sha256 must be the payload's 32-byte SHA-256 digest, got {sha256!r}")
    # join copies each slice once, straight into its chunk.
    return [b"".join((_pack_header(message_id, index, count, chunk_size, view.nbytes, digest),
                      view[index * chunk_size:(index + 1) * chunk_size])) for index in range(count)]  # fmt: skip


class ChunkStream:
    """Cuts a payload into chunks while its bytes are still being produced.

    For a sender that knows the payload's size but not yet all of its bytes (a signer,
    whose MAC comes last): ``add`` hashes the bytes once and returns the chunks they
    complete, their digest field zero; ``finish`` returns the last chunk, which states the
    SHA-256 of the whole. So the first chunk can go out before the last byte is hashed,
    and hashing overlaps with the transfer instead of preceding it.

    Chunks are built from views of the added buffers; do not change a buffer passed to
    ``add`` before ``finish``.
    """

    def __init__(self, total_size: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 message_id: bytes | None = None) -> None:  # fmt: skip
        if isinstance(total_size, bool) or not isinstance(total_size, int) or total_size < 0:
            raise ValueError(f"total_size must be a non-negative integer, got {total_size!r}")
        _check_chunk_size(chunk_size)
        self.message_id = _message_id_or_new(message_id)
        self.total_size = total_size
        self.chunk_size = chunk_size
        self.count = _chunk_count(total_size, chunk_size)
        self._hasher = hashlib.sha256()
        self._added = 0
        self._index = 0  # the chunk being filled
        self._parts: list[memoryview] = []
        self._filled = 0  # payload bytes in self._parts
        self._finished = False

    def add(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Append the payload's next bytes; returns the chunks (not the last) they complete."""
        view = memoryview(data).cast("B")
        if self._finished or self._added + view.nbytes > self.total_size:
            raise ValueError(f"adding {view.nbytes} bytes after {self._added} would exceed the declared "
                             f"{self.total_size}-byte payload")  # fmt: skip
        self._hasher.update(view)
        self._added += view.nbytes
        completed = []
        while view.nbytes:
            taken = view[:self.chunk_size - self._filled]
            self._parts.append(taken)
            self._filled += taken.nbytes
            view = view[taken.nbytes:]
            if self._filled == self.chunk_size and self._index < self.count - 1:
                completed.append(self._cut(SHA256_NOT_STATED))
        return completed

    def sha256_so_far(self) -> bytes:
        """SHA-256 of the bytes added so far (a signer's digest of what it signs)."""
        return self._hasher.copy().digest()

    def finish(self) -> bytes:
        """The last chunk, stating the SHA-256 of the whole payload; every byte must be added."""
        if self._finished or self._added != self.total_size:
            raise ValueError(f"the payload is {self.total_size} bytes but {self._added} were added; "
                             "add them all before finishing (and finish once)")  # fmt: skip
        self._finished = True
        return self._cut(self._hasher.digest())

    def _cut(self, digest: bytes) -> bytes:
        header = _pack_header(self.message_id, self._index, self.count, self.chunk_size, self.total_size, digest)
        chunk = b"".join((header, *self._parts))
        self._index += 1
        self._parts, self._filled = [], 0
        return chunk


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
            MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):  # fmt: skip
        raise ValueError(f"chunk_size must be an integer from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes, "
                         f"got {chunk_size!r}")  # fmt: skip


def _message_id_or_new(message_id: bytes | None) -> bytes:
    if message_id is None:
        return new_message_id()
    if not isinstance(message_id, (bytes, bytearray)) or len(message_id) != MESSAGE_ID_SIZE:
        raise ValueError(f"message_id must be {MESSAGE_ID_SIZE} bytes, got {message_id!r}")
    return bytes(message_id)


def _chunk_count(total_size: int, chunk_size: int) -> int:
    count = expected_chunk_count(total_size, chunk_size)
    if count > 0xFFFFFFFF:
        raise ValueError(f"a {total_size}-byte payload needs {count} chunks, more than a header can count; "
                         "use a larger chunk_size")  # fmt: skip
    return count


def _pack_header(message_id: bytes, index: int, count: int, chunk_size: int, total_size: int, digest: bytes) -> bytes:
    return _HEADER.pack(CHUNK_MAGIC, PROTOCOL_VERSION, message_id, index, count, chunk_size, total_size, digest)


def parse_chunk_header(chunk: bytes | bytearray | memoryview, *, sender: str | None = None) -> ChunkHeader:
    """Read and sanity-check a chunk's header without trusting any of its numbers."""
    if len(chunk) < CHUNK_HEADER_SIZE:
        raise ProtocolError(ReasonCode.TRUNCATED_HEADER,
                            f"chunk of {len(chunk)} bytes is shorter than the {CHUNK_HEADER_SIZE}-byte chunk header; "
                            "the publisher sent something that is not a FedVLM chunk", sender=sender)  # fmt: skip
    magic, version, message_id, index, count, chunk_size, total_size, digest = _HEADER.unpack_from(chunk)
    if magic != CHUNK_MAGIC:
        raise ProtocolError(ReasonCode.MALFORMED,
                            f"chunk starts with {magic!r}, not the chunk magic {CHUNK_MAGIC!r}", sender=sender)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION,
                            f"chunk uses protocol version {version}; this FedVLM speaks version {PROTOCOL_VERSION}, "
                            "so upgrade whichever side is older", sender=sender, message_id=message_id)  # fmt: skip
    return ChunkHeader(message_id, index, count, chunk_size, total_size, digest)


class _PendingMessage:
    """One incomplete message: the chunks received so far, and the hash of their leading run.

    Chunks are kept as they came (no buffer of the declared size is allocated up front), so
    what a message costs in memory is what its sender actually sent, whatever its header
    claims; the payload is joined once, at completion.
    """

    __slots__ = ("header", "parts", "received_count", "deadline", "hasher", "hashed_chunks", "hashed_bytes",
                 "head_size", "head_sha256")

    def __init__(self, header: ChunkHeader, deadline: float, trailer_size: int) -> None:
        # The first chunk's header; it takes the digest from the first chunk that states one.
        self.header = header
        self.parts: dict[int, memoryview] = {}
        self.received_count = 0
        self.deadline = deadline
        # SHA-256 of the leading run of received chunks, extended as chunks arrive.
        self.hasher = hashlib.sha256()
        self.hashed_chunks = 0
        self.hashed_bytes = 0
        # Where the hasher's state is copied for CompletedMessage.head_sha256 (None: never).
        self.head_size = header.total_size - trailer_size if 0 < trailer_size <= header.total_size else None
        self.head_sha256: bytes | None = None
        if self.head_size == 0:
            self.head_sha256 = hashlib.sha256().digest()

    def learn_sha256(self, header: ChunkHeader) -> None:
        if header.states_sha256 and not self.header.states_sha256:
            self.header = dataclasses.replace(self.header, sha256=header.sha256)

    def hash_ready_chunks(self) -> None:
        """Extend the running hash over every chunk now contiguous with the hashed prefix.

        MQTT keeps one publisher's QoS 1 messages on a topic in order, so chunks usually
        arrive in order and the check at completion costs nothing more; a chunk that comes
        early waits until the gap before it fills. Either way each byte is hashed once.
        """
        while (ready := self.parts.get(self.hashed_chunks)) is not None:
            if self.head_sha256 is None and self.head_size is not None and (
                    self.hashed_bytes + ready.nbytes >= self.head_size):  # fmt: skip
                # The head ends in this chunk: one pass gives both digests.
                split = self.head_size - self.hashed_bytes
                self.hasher.update(ready[:split])
                self.head_sha256 = self.hasher.copy().digest()
                self.hasher.update(ready[split:])
            else:
                self.hasher.update(ready)
            self.hashed_bytes += ready.nbytes
            self.hashed_chunks += 1

    def payload(self) -> bytes:
        return b"".join(self.parts[index] for index in range(self.header.count))


class Reassembler:
    """Turns chunks back into payloads, keyed by (sender, message id).

    Limits, all checked from the header before anything is allocated:

    - ``max_message_bytes``: largest payload accepted (``TOO_LARGE`` otherwise);
    - ``max_pending_messages`` and ``max_pending_bytes``: incomplete messages held at once
      (a new message beyond them is refused with ``OVERLOADED``); ``max_pending_per_sender``
      and ``max_pending_bytes_per_sender`` (default: ``max_message_bytes``): how many of
      those messages, and how many of those declared bytes, one sender may hold, so no one
      sender can take the room every other sender needs;
    - ``timeout_s``: a message must complete within this many seconds of its first chunk,
      or it is dropped and reported by ``drain_expired`` as ``EXPIRED``.

    ``feed`` raises ``ProtocolError`` for a refused chunk or dropped message. A message is
    reported once: after it completes or is dropped, further chunks of it (QoS 1
    duplicates, the rest of a refused message) are ignored for ``timeout_s``, unless the
    receiver calls ``forget`` to have a re-send of it reassembled afresh.

    ``trailer_size``: also report the SHA-256 of every payload without its last
    ``trailer_size`` bytes (``CompletedMessage.head_sha256``), from the same hashing pass;
    the hub passes the envelope's MAC size, so verifying an update needs no second pass.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_pending_messages: int = DEFAULT_MAX_PENDING_MESSAGES,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic, trailer_size: int = 0,
                 max_pending_per_sender: int = DEFAULT_MAX_PENDING_PER_SENDER,
                 max_pending_bytes_per_sender: int | None = None) -> None:  # fmt: skip
        if max_pending_bytes_per_sender is None:
            max_pending_bytes_per_sender = max_message_bytes
        for name, value in (("max_message_bytes", max_message_bytes), ("max_pending_messages", max_pending_messages),
                            ("max_pending_bytes", max_pending_bytes),
                            ("max_pending_per_sender", max_pending_per_sender),
                            ("max_pending_bytes_per_sender", max_pending_bytes_per_sender)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_message_bytes > max_pending_bytes:
            raise ValueError(f"max_message_bytes ({max_message_bytes}) exceeds max_pending_bytes "
                             f"({max_pending_bytes}), "
                             "so the largest message could never be held; raise max_pending_bytes")  # fmt: skip
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if isinstance(trailer_size, bool) or not isinstance(trailer_size, int) or trailer_size < 0:
            raise ValueError(f"trailer_size must be a non-negative integer, got {trailer_size!r}")
        self.max_message_bytes = max_message_bytes
        self.max_pending_messages = max_pending_messages
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_per_sender = max_pending_per_sender
        self.max_pending_bytes_per_sender = max_pending_bytes_per_sender
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self.trailer_size = trailer_size
        # Insertion order is start order and every message gets the same timeout, so the
        # first entry always expires first.
        self._pending: dict[tuple[str, bytes], _PendingMessage] = {}
        self._pending_bytes = 0
        self._pending_per_sender: collections.Counter[str] = collections.Counter()
        self._pending_bytes_per_sender: collections.Counter[str] = collections.Counter()
        # Messages already completed or dropped -> when to forget them. Bounded so a flood
        # of message ids cannot grow it without limit.
        self._finished: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()
        self._max_finished = max(4096, 4 * max_pending_messages)
        # Expired messages not yet handed to drain_expired; bounded for a caller that never drains.
        self._expired: collections.deque[DroppedMessage] = collections.deque(maxlen=max(1024, max_pending_messages))

    @property
    def pending_message_count(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Payload bytes that incomplete messages declare (what admission is limited by; the
        memory actually held is only what has arrived)."""
        return self._pending_bytes

    def feed(self, chunk: bytes | bytearray | memoryview, *, sender: str) -> CompletedMessage | None:
        """Add one chunk from ``sender``; return the message when this chunk completes it.

        Returns None for a chunk that leaves its message incomplete and for a chunk of a
        message already completed or dropped. Raises ``ProtocolError`` when the chunk is
        refused (the rest of its message may still arrive) or its message is dropped.
        """
        now = self._clock()
        self._expire(now)
        header = parse_chunk_header(chunk, sender=sender)
        key = (sender, header.message_id)
        if key in self._finished:
            return None
        pending = self._pending.get(key)
        if pending is not None and (differences := header.differences_from(pending.header)):
            raise self._error(ReasonCode.INCONSISTENT, header, sender,
                              f"chunk {header.index} refused: it disagrees with the message's first chunk on "
                              f"{'; '.join(differences)}")  # fmt: skip
        if pending is None and header.total_size > self.max_message_bytes:
            self._remember_finished(key, now)
            raise self._error(ReasonCode.TOO_LARGE, header, sender,
                              f"declares {header.total_size} bytes, over this receiver's limit of "
                              f"{self.max_message_bytes}; send a smaller payload or raise "
                              "max_message_bytes")  # fmt: skip
        self._check_chunk(header, len(chunk) - CHUNK_HEADER_SIZE, sender)
        if pending is None:
            pending = self._start(key, header, now)
        if header.index in pending.parts:
            return None  # a duplicate (QoS 1 redelivery): already kept
        pending.learn_sha256(header)
        data = memoryview(chunk)[CHUNK_HEADER_SIZE:]
        # Keep a reference to immutable bytes (what MQTT clients hand over); copy anything a
        # caller could still change.
        pending.parts[header.index] = data if isinstance(chunk, bytes) else memoryview(bytes(data))
        pending.received_count += 1
        pending.hash_ready_chunks()
        if pending.received_count < header.count:
            return None
        return self._complete(key, pending, now)

    def forget(self, sender: str, message_id: bytes) -> None:
        """Treat ``message_id`` from ``sender`` as never seen: its next chunks start it again.

        For a receiver whose verdict on a completed message was "not now" (late, wrong
        round), so that the same message sent again later is judged again.
        """
        self._finished.pop((sender, message_id), None)

    def drain_expired(self) -> list[DroppedMessage]:
        """Messages that timed out since the last call (each reported once); frees their memory."""
        self._expire(self._clock())
        expired = list(self._expired)
        self._expired.clear()
        return expired

    # ------------------------------------------------------------------ internals
    def _error(self, reason: ReasonCode, header: ChunkHeader, sender: str, text: str) -> ProtocolError:
        return ProtocolError(reason, f"message {header.message_id.hex()} from {sender!r}: {text}",
                             sender=sender, message_id=header.message_id)  # fmt: skip

    def _check_chunk(self, header: ChunkHeader, data_size: int, sender: str) -> None:
        """Checks that need only this chunk, done before any allocation."""
        if not MIN_CHUNK_SIZE <= header.chunk_size <= MAX_CHUNK_SIZE:
            raise self._error(ReasonCode.MALFORMED, header, sender,
                              f"chunk size {header.chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        expected_count = expected_chunk_count(header.total_size, header.chunk_size)
        if header.count != expected_count:
            raise self._error(ReasonCode.INCONSISTENT, header, sender,
                              f"declares {header.count} chunks, but {header.total_size} bytes in chunks of "
                              f"{header.chunk_size} make {expected_count}")  # fmt: skip
        if header.index >= header.count:
            raise self._error(ReasonCode.INCONSISTENT, header, sender,
                              f"chunk index {header.index} is not below the chunk count {header.count}")
        if data_size != header.expected_data_size():
            raise self._error(ReasonCode.INCONSISTENT, header, sender,
                              f"chunk {header.index} carries {data_size} payload bytes, its header implies "
                              f"{header.expected_data_size()}; the chunk was truncated or padded")  # fmt: skip
        if header.is_last and not header.states_sha256:
            raise self._error(ReasonCode.MALFORMED, header, sender,
                              f"the last chunk ({header.index}) leaves the payload's SHA-256 zero; only chunks "
                              "before the last may leave it to the last one")  # fmt: skip

    def _start(self, key: tuple[str, bytes], header: ChunkHeader, now: float) -> _PendingMessage:
        sender = key[0]
        if self._pending_per_sender[sender] >= self.max_pending_per_sender:
            self._remember_finished(key, now)
            raise self._error(ReasonCode.OVERLOADED, header, sender,
                              f"refused: this sender already has {self._pending_per_sender[sender]} incomplete "
                              "messages (the limit per sender); finish or abandon those first")  # fmt: skip
        if self._pending_bytes_per_sender[sender] + header.total_size > self.max_pending_bytes_per_sender:
            self._remember_finished(key, now)
            raise self._error(ReasonCode.OVERLOADED, header, sender,
                              f"refused: its {header.total_size} bytes would take this sender's incomplete messages "
                              f"past {self.max_pending_bytes_per_sender} bytes (the limit per sender; "
                              f"{self._pending_bytes_per_sender[sender]} in use); finish or abandon those first")
        if len(self._pending) >= self.max_pending_messages:
            self._remember_finished(key, now)
            raise self._error(ReasonCode.OVERLOADED, header, sender,
                              f"refused: already reassembling {len(self._pending)} messages (the limit); "
                              "the sender should retry later")  # fmt: skip
        if self._pending_bytes + header.total_size > self.max_pending_bytes:
            self._remember_finished(key, now)
            raise self._error(ReasonCode.OVERLOADED, header, sender,
                              f"refused: its {header.total_size} bytes would take pending memory past "
                              f"{self.max_pending_bytes} ({self._pending_bytes} in use); the sender should retry later")
        pending = _PendingMessage(header, deadline=now + self.timeout_s, trailer_size=self.trailer_size)
        self._pending[key] = pending
        self._pending_bytes += header.total_size
        self._pending_per_sender[sender] += 1
        self._pending_bytes_per_sender[sender] += header.total_size
        return pending

    def _release(self, key: tuple[str, bytes], pending: _PendingMessage) -> None:
        del self._pending[key]
        self._pending_bytes -= pending.header.total_size
        sender = key[0]
        self._pending_per_sender[sender] -= 1
        self._pending_bytes_per_sender[sender] -= pending.header.total_size
        if not self._pending_per_sender[sender]:
            del self._pending_per_sender[sender]
            del self._pending_bytes_per_sender[sender]

    def _complete(self, key: tuple[str, bytes], pending: _PendingMessage, now: float) -> CompletedMessage:
        self._release(key, pending)
        self._remember_finished(key, now)
        digest = pending.hasher.digest()  # every chunk is hashed once all have arrived
        # The last chunk states the digest, and it has arrived.
        if digest != pending.header.sha256:
            raise self._error(ReasonCode.CORRUPT, pending.header, key[0],
                              f"dropped: reassembled bytes have SHA-256 {digest.hex()}, header says "
                              f"{pending.header.sha256.hex()}; the sender should resend")  # fmt: skip
        return CompletedMessage(sender=key[0], message_id=key[1], payload=pending.payload(), sha256=digest,
                                head_sha256=pending.head_sha256)  # fmt: skip

    def _remember_finished(self, key: tuple[str, bytes], now: float) -> None:
        self._finished[key] = now + self.timeout_s
        self._finished.move_to_end(key)
        while len(self._finished) > self._max_finished:
            self._finished.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                break
            self._release(key, pending)
            self._remember_finished(key, now)
            self._expired.append(DroppedMessage(
                sender=key[0], message_id=key[1], reason=ReasonCode.EXPIRED,
                detail=(f"message {key[1].hex()} from {key[0]!r} expired after {self.timeout_s:g} s with "
                        f"{pending.received_count} of {pending.header.count} chunks received; "
                        "the sender should resend"),
            ))  # fmt: skip
        while self._finished:
            key, forget_at = next(iter(self._finished.items()))
            if forget_at > now:
                break
            del self._finished[key]
