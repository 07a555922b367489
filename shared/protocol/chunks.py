"""Payloads split into MQTT-sized chunks: the chunk format and the two ways to write it.

Each chunk is a fixed 74-byte header followed by up to ``chunk_size`` payload bytes
(all integers big-endian)::

    offset  size  field
    0       4     magic b"FVCK"
    4       2     protocol version (2)
    6       16    message id: the same in every chunk of one payload
    22      4     chunk index, 0-based
    26      4     chunk count
    30      4     chunk size: payload bytes in every chunk but the last
    34      8     total payload size in bytes
    42      32    SHA-256 of the whole payload; in chunks before the last it may be
                  zero ("stated in the last chunk")
    74      ...   this chunk's payload bytes

Every chunk repeats the sizes, so a receiver can size and check a message from
whichever chunk arrives first (``reassembly.Reassembler``). The digest is always in the
last chunk; a sender that knows it up front (``split_payload``) repeats it in every
chunk, and a sender still producing the payload (``ChunkStream``) leaves it zero until
the last, so it can hash and publish in one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import struct

from .errors import ProtocolError, ReasonCode
from .version import PROTOCOL_VERSION

__all__ = [
    "CHUNK_MAGIC",
    "CHUNK_HEADER_SIZE",
    "MESSAGE_ID_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "SHA256_NOT_STATED",
    "ChunkHeader",
    "ChunkStream",
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
