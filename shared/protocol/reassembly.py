"""Chunks back into payloads, with bounded memory and time (the receiving side of ``chunks``).

Chunks may arrive in any order or twice (QoS 1 redelivers); a message is handed over
once, whole, and only when its bytes match the SHA-256 its last chunk states.
``Reassembler`` is not thread-safe; feed it from one thread (paho calls its callbacks
from its network thread).

Zero-length messages on a retained chunk topic are the broker's way of saying a retained
message was deleted; transports skip them instead of feeding them here.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable

from .chunks import (
    CHUNK_HEADER_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ChunkHeader,
    expected_chunk_count,
    parse_chunk_header,
)
from .errors import ProtocolError, ReasonCode

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "DEFAULT_MAX_PENDING_PER_SENDER",
    "DEFAULT_MAX_PENDING_BYTES",
    "DEFAULT_TIMEOUT_S",
    "CompletedMessage",
    "DroppedMessage",
    "Reassembler",
]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_PENDING_MESSAGES = 64
# One sender (one client's topic) may hold only a few of those slots, so a buggy or hostile
# client cannot starve the others; an honest device sends one update at a time (the room
# left covers a few uploads abandoned by crashes within the reassembly timeout).
DEFAULT_MAX_PENDING_PER_SENDER = 8
DEFAULT_MAX_PENDING_BYTES = 1024 * 1024 * 1024
# Long enough for a large update over a slow uplink (256 MiB at ~4 Mbit/s).
DEFAULT_TIMEOUT_S = 600.0


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
        """Take the digest from the first chunk that states one. Every later statement
        must agree with it (``differences_from``), the last chunk's included, and the
        last chunk must state it, so the digest checked at completion is the sender's."""
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

    A message refused only because the reassembler is full (``OVERLOADED`` for lack of
    room overall, not a sender's own limits) is not held against it: the rest of that
    attempt's chunks are ignored, and the message is admitted afresh when its first chunk
    comes again (the sender's retry), so an honest device is never dropped for good.

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
        # of message ids cannot grow it without limit. A late copy of a message forgotten
        # here is reassembled again and its receiver sees the duplicate (the hub answers it
        # from its verdicts or receipts); copies come soon after the first (a redelivery, a
        # re-send), so 1,024 entries (~0.3 KB each) cover them: 4,096 held ~1 MiB more at
        # 10,000 devices a round than at 1,000.
        self._finished: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()
        self._max_finished = max(1024, 4 * max_pending_messages)
        # Messages refused for lack of room: the rest of that attempt is ignored, a re-send
        # (from chunk 0) is admitted afresh. Its own, longer bound: under load a refused
        # update's later chunks may come after thousands of other refusals, and one forgotten
        # here is refused again chunk by chunk or takes a slot it cannot fill. Empty unless
        # the receiver is overloaded.
        self._refused_for_load: collections.OrderedDict[tuple[str, bytes], None] = collections.OrderedDict()
        self._max_refused = max(4096, 4 * max_pending_messages)
        # Expired messages not yet handed to drain_expired; bounded for a caller that never drains.
        self._expired: collections.deque[DroppedMessage] = collections.deque(maxlen=max(1024, max_pending_messages))

    @property
    def finished_kept(self) -> int:
        """How many completed or dropped messages are remembered (a copy of one is ignored)."""
        return self._max_finished

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
        if key in self._refused_for_load:
            if header.index != 0:
                return None  # the rest of an attempt refused for load
            del self._refused_for_load[key]  # the sender tries again: judge admission afresh
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

    def is_pending(self, sender: str, message_id: bytes) -> bool:
        """Whether that message is being reassembled (some chunks in, not complete)."""
        return (sender, message_id) in self._pending

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
            self._remember_refused_for_load(key)
            raise self._error(ReasonCode.OVERLOADED, header, sender,
                              f"refused: already reassembling {len(self._pending)} messages (the limit); "
                              "the sender should retry later")  # fmt: skip
        if self._pending_bytes + header.total_size > self.max_pending_bytes:
            self._remember_refused_for_load(key)
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

    def _remember_refused_for_load(self, key: tuple[str, bytes]) -> None:
        self._refused_for_load[key] = None
        self._refused_for_load.move_to_end(key)
        while len(self._refused_for_load) > self._max_refused:
            self._refused_for_load.popitem(last=False)

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
