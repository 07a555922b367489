"""Global versions on the wire: the payload's bytes, its retained chunks, its manifest.

Order of a publication: every chunk (retained), then the manifest (retained), then the
previous version's retained chunks are cleared (zero-length retained messages). A client
that sees a manifest can therefore always fetch all of its chunks, and a client that
joins late finds exactly one version's chunks on the broker.

The chunks' message id is the first 16 bytes of the payload's SHA-256, so publishing a
version again (after a crash, or to a broker that lost its retained messages) produces
byte-identical chunks instead of a second set that could mix with the first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedvlm.shared import tensor_codec
from fedvlm.shared.mqtt_link import MqttLink
from fedvlm.shared.protocol import GlobalManifest, Topics, split_payload

__all__ = ["global_payload", "GlobalPublisher"]


def global_payload(tensors: Mapping[str, np.ndarray], *, federation: str, version: int, round_number: int,
                   strategy: str) -> bytes:  # fmt: skip
    """The safetensors bytes of one global version, with the metadata clients read."""
    metadata = {"federation": federation, "version": str(version), "round": str(round_number), "strategy": strategy}
    return tensor_codec.encode(tensors, metadata)


class GlobalPublisher:
    """Publishes global versions and clears superseded ones on one MQTT link."""

    def __init__(self, link: MqttLink, topics: Topics, *, timeout: float = 60.0) -> None:
        self.link = link
        self.topics = topics
        self.timeout = timeout

    def publish(self, payload: bytes, manifest: GlobalManifest) -> None:
        """Chunks first, manifest last: a manifest never names chunks that are not there yet."""
        message_id = hashlib.sha256(payload).digest()[:16]
        chunks = split_payload(payload, chunk_size=manifest.chunk_size, message_id=message_id)
        if len(chunks) != manifest.chunk_count:
            raise ValueError(f"global version {manifest.version}: manifest says {manifest.chunk_count} chunks, "
                             f"the payload makes {len(chunks)}")  # fmt: skip
        self.link.publish_many([(self.topics.global_chunk(manifest.version, index), chunk)
                                for index, chunk in enumerate(chunks)], qos=1, retain=True, timeout=self.timeout)
        # Only after every chunk is acknowledged: the manifest goes out last.
        self.link.publish(self.topics.global_manifest(), manifest.to_json(), qos=1, retain=True, timeout=self.timeout)

    def clear(self, version: int, chunk_count: int) -> None:
        """Delete a superseded version's retained chunks (zero-length retained messages)."""
        self.link.publish_many([(self.topics.global_chunk(version, index), b"") for index in range(chunk_count)],
                               qos=1, retain=True, timeout=self.timeout)
