"""A round's running aggregate as bytes, so it can be committed with the round's receipts.

``Aggregator.to_state()`` is a dict of arrays (under ``"sums"``) and JSON values (count,
total weight, strategy, ...). The arrays go into a safetensors body, the rest into its
metadata as JSON; floats keep every bit (``json`` writes ``repr``), so a resumed round
continues from exactly the sum it had committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedvlm.shared import tensor_codec

__all__ = ["encode_aggregate", "decode_aggregate"]

_STATE_KEY = "fedvlm_aggregate_state"


def encode_aggregate(state: Mapping[str, Any]) -> bytes:
    """``Aggregator.to_state()`` output as safetensors bytes."""
    sums = {name: np.ascontiguousarray(array) for name, array in state.get("sums", {}).items()}
    rest = {key: value for key, value in state.items() if key != "sums"}
    return tensor_codec.encode(sums, {_STATE_KEY: json.dumps(rest, default=_plain)})


def decode_aggregate(data: bytes) -> dict[str, Any]:
    """The state ``encode_aggregate`` wrote; raises ``CodecError``/``ValueError`` if it is not one."""
    sums, metadata = tensor_codec.decode(data)
    if _STATE_KEY not in metadata:
        raise ValueError("the stored round aggregate lacks its state metadata")
    return {**json.loads(metadata[_STATE_KEY]), "sums": sums}


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cannot store {type(value).__name__} in a round aggregate")
