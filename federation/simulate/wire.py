"""What would cross the network, encoded exactly as the edge client and the hub encode it.

Bytes are counted on these payloads (safetensors bytes with the same metadata), and the
aggregation and the clients read the tensors back from them, so what is averaged is what
was counted. Not counted: the fixed-size signature envelope and chunk headers (tens of
bytes per message), and MQTT framing.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedvlm.hub.publisher import global_payload
from fedvlm.shared import tensor_codec

FEDERATION = "simulation"


def update_payload(shared: Mapping[str, np.ndarray], *, round_number: int, client_id: str, samples: int,
                   strategy: str, base_fingerprint: str, lora_config_hash: str) -> bytes:
    """A client's update body as ``fedvlm-edge join`` signs and sends it (its shared tensors)."""
    metadata = {"federation": FEDERATION, "round": str(round_number), "client_id": client_id,
                "sample_count": str(samples), "strategy": strategy, "base_fingerprint": base_fingerprint,
                "lora_config_hash": lora_config_hash}
    return tensor_codec.encode(shared, metadata)


def global_version_payload(tensors: Mapping[str, np.ndarray], *, round_number: int, strategy: str) -> bytes:
    """A global version as ``fedvlm-hub start`` publishes it (``fedvlm.hub.publisher.global_payload``)."""
    return global_payload(tensors, federation=FEDERATION, version=round_number, round_number=round_number,
                          strategy=strategy)


def received(payload: bytes) -> dict[str, np.ndarray]:
    """The tensors a receiver decodes from a payload (read-only: the aggregator only reads
    them and a client copies a global version when it absorbs it)."""
    tensors, _ = tensor_codec.decode(payload)
    return dict(tensors)
