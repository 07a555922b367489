"""Sending an update: sign it and cut it into chunks in one pass, while it is published.

The envelope's MAC signs the SHA-256 of everything before it, and the last chunk states
the SHA-256 of the whole, so both come from one running hash. ``SignedUpload.chunks``
hashes each chunk as it cuts it and hands it to the publisher at once: the first chunk
leaves after microseconds instead of after a full pass over the update, and hashing the
rest overlaps with the transfer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .chunks import DEFAULT_CHUNK_SIZE, ChunkStream
from .messages import EnvelopeMetadata
from .signing import EnvelopeSigner

__all__ = ["SignedUpload"]


class SignedUpload:
    """One update, signed and chunked as it is published.

    Construction checks everything that can be wrong with the arguments (client id,
    secret, metadata, chunk size), so errors surface before anything is published.
    Iterate ``chunks()`` once, lazily (``MqttLink.publish_many`` pulls from it); the chunks
    it produced stay in ``sent`` for re-sending.

    ``signed_part`` (everything the MAC covers) is known before any hashing, so a sender can
    save the update while its first chunks travel, and ``seal_envelope`` rebuilds the exact
    envelope from it later. ``before_last_chunk()`` runs when every chunk but the last has
    been produced: a receiver cannot complete the message before its last chunk, so a
    sender that waits there for its save never has an update accepted that it has not kept.
    """

    def __init__(self, body: bytes | bytearray | memoryview, metadata: EnvelopeMetadata | Mapping[str, Any],
                 client_id: str, secret: bytes | str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 message_id: bytes | None = None) -> None:  # fmt: skip
        self._body = memoryview(body).cast("B")
        self._signer = EnvelopeSigner(self._body.nbytes, metadata, client_id, secret)
        self._stream = ChunkStream(self._signer.envelope_size, chunk_size=chunk_size, message_id=message_id)
        self.sent: list[bytes] = []
        self._producing = False

    @property
    def message_id(self) -> bytes:
        return self._stream.message_id

    @property
    def envelope_size(self) -> int:
        return self._signer.envelope_size

    @property
    def chunk_size(self) -> int:
        return self._stream.chunk_size

    @property
    def chunk_count(self) -> int:
        return self._stream.count

    @property
    def signed_part(self) -> tuple[bytes, memoryview]:
        """The envelope without its MAC, as (prefix, body): write the pieces in order."""
        return self._signer.prefix, self._body

    def chunks(self, before_last_chunk: Callable[[], None] | None = None) -> Iterator[bytes]:
        """The chunks in order, each produced when the consumer asks for it (once only)."""
        if self._producing:
            raise RuntimeError("this upload's chunks were already produced; re-send SignedUpload.sent")
        self._producing = True
        return self._produce(before_last_chunk)

    def _produce(self, before_last_chunk: Callable[[], None] | None) -> Iterator[bytes]:
        # Runs in the consumer's thread, between its publishes: publish_many's timeout also
        # covers this hashing and any wait in before_last_chunk.
        stream, prefix, body = self._stream, self._signer.prefix, self._body
        yield from self._kept(stream.add(prefix))
        # A chunk's worth at a time: each chunk is yielded as soon as it is hashed.
        for offset in range(0, body.nbytes, stream.chunk_size):
            yield from self._kept(stream.add(body[offset:offset + stream.chunk_size]))
        mac = self._signer.mac(stream.sha256_so_far())
        # With a last chunk shorter than the MAC, the one before it holds part of the MAC.
        yield from self._kept(stream.add(mac))
        if before_last_chunk is not None:
            before_last_chunk()
        yield from self._kept([stream.finish()])

    def _kept(self, chunks: list[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.sent.append(chunk)
            yield chunk
