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

    ``before_last_chunk(envelope)`` runs when every chunk but the last has been produced,
    with the complete envelope: a receiver cannot complete the message before the last
    chunk, so a sender that saves the envelope there never has an update accepted that it
    has not kept.
    """

    def __init__(self, body: bytes | bytearray | memoryview, metadata: EnvelopeMetadata | Mapping[str, Any],
                 client_id: str, secret: bytes | str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 message_id: bytes | None = None) -> None:  # fmt: skip
        self._body = memoryview(body).cast("B")
        self._signer = EnvelopeSigner(self._body.nbytes, metadata, client_id, secret)
        self._stream = ChunkStream(self._signer.envelope_size, chunk_size=chunk_size, message_id=message_id)
        self.message_id = self._stream.message_id
        self.envelope_size = self._signer.envelope_size
        self.chunk_count = self._stream.count
        self.sent: list[bytes] = []
        self._producer: Iterator[bytes] | None = None

    def chunks(self, before_last_chunk: Callable[[bytes], None] | None = None) -> Iterator[bytes]:
        """The chunks in order, each produced when the consumer asks for it (once only)."""
        if self._producer is not None:
            raise RuntimeError("this upload's chunks were already produced; re-send SignedUpload.sent")
        self._producer = self._produce(before_last_chunk)
        return self._producer

    def finish(self) -> None:
        """Produce whatever the consumer did not take (hashing it, and running
        ``before_last_chunk``), e.g. after publishing failed midway, so the update can be
        kept and re-sent whole later. Raises RuntimeError when producing itself failed
        earlier (an error in ``before_last_chunk``): nothing is left that could finish it."""
        if self._producer is None:
            self.chunks()
        for _ in self._producer:
            pass
        if not self._stream.finished:
            raise RuntimeError("this upload stopped before its last chunk (producing it failed); sign a new one")

    def _produce(self, before_last_chunk: Callable[[bytes], None] | None) -> Iterator[bytes]:
        # Runs in the consumer's thread, between its publishes: publish_many's timeout also
        # covers this hashing and before_last_chunk (the edge's fsyncs), which take
        # milliseconds against a transfer of the same bytes.
        stream, prefix, body = self._stream, self._signer.prefix, self._body
        yield from self._kept(stream.add(prefix))
        # A chunk's worth at a time: each chunk is yielded as soon as it is hashed.
        for offset in range(0, body.nbytes, stream.chunk_size):
            yield from self._kept(stream.add(body[offset:offset + stream.chunk_size]))
        mac = self._signer.mac(stream.sha256_so_far())
        # With a last chunk shorter than the MAC, the one before it holds part of the MAC.
        yield from self._kept(stream.add(mac))
        if before_last_chunk is not None:
            before_last_chunk(b"".join((prefix, body, mac)))
        yield from self._kept([stream.finish()])

    def _kept(self, chunks: list[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.sent.append(chunk)
            yield chunk
