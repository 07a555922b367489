"""What the hub checks inside an update whose signature already verified.

The order matters: the envelope's HMAC is checked first (``open_envelope``), then the
cheap metadata checks here, and only then are the tensors decoded, so an update from a
wrong federation or strategy never costs a safetensors parse. Every refusal is an
:class:`UpdateRejected` carrying the reason code and a sentence for the client's operator.

The federation *pins* what all its updates must share: the base model fingerprint and
the tensor layout (names, shapes, dtypes). Both come from the first accepted update
unless the base fingerprint was configured, and are stored with that update's receipt.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import EnvelopeMetadata, MessageKind, ReasonCode, VerifiedEnvelope
from fedvlm.shared.strategies import Strategy
from fedvlm.shared.tensor_codec import CodecError, TensorMismatchError, TensorSpec

__all__ = [
    "UpdateRejected",
    "UpdateRules",
    "FederationPins",
    "DecodedUpdate",
    "check_addressing",
    "check_compatibility",
    "decode_update",
    "LayoutVerdicts",
    "PIN_BASE_FINGERPRINT",
    "PIN_TENSOR_SPEC",
]

# Keys of the pins in the store's meta table.
PIN_BASE_FINGERPRINT = "base_fingerprint"
PIN_TENSOR_SPEC = "tensor_spec"
# Metrics a client reports travel in the body metadata; kept with the receipt, bounded.
_MAX_METRICS_CHARS = 64 * 1024


class UpdateRejected(Exception):
    """An update the hub refuses; ``reason`` goes in the Ack, ``text`` tells the client why."""

    def __init__(self, reason: ReasonCode, text: str) -> None:
        super().__init__(text)
        self.reason = ReasonCode(reason)
        self.text = text


@dataclasses.dataclass(frozen=True)
class UpdateRules:
    """The federation's fixed facts an update must agree with."""

    federation: str
    strategy: Strategy
    lora_config_hash: str
    max_update_bytes: int
    # A client's claimed sample count weights its update in the mean; above this it
    # counts as this many (None: as claimed).
    max_sample_count: int | None = None

    def weight_of(self, sample_count: int) -> int:
        """The weight an update claiming ``sample_count`` samples gets in the mean."""
        if self.max_sample_count is None:
            return sample_count
        return min(sample_count, self.max_sample_count)


@dataclasses.dataclass(frozen=True)
class FederationPins:
    """What the first accepted update (or the configuration) fixed for the whole federation."""

    base_fingerprint: str | None = None
    tensor_spec: TensorSpec | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, str | None]) -> FederationPins:
        spec = meta.get(PIN_TENSOR_SPEC)
        return cls(base_fingerprint=meta.get(PIN_BASE_FINGERPRINT),
                   tensor_spec=TensorSpec.from_json(spec) if spec else None)  # fmt: skip

    def updated(self, new_pins: Mapping[str, str]) -> FederationPins:
        return FederationPins.from_meta({PIN_BASE_FINGERPRINT: self.base_fingerprint,
                                         PIN_TENSOR_SPEC: self.tensor_spec.to_json() if self.tensor_spec else None,
                                         **new_pins})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DecodedUpdate:
    """An update's tensors, checked against the federation; ``new_pins`` are what it pins, if first."""

    tensors: dict[str, np.ndarray]
    metrics: str | None
    new_pins: dict[str, str]


def check_addressing(metadata: EnvelopeMetadata, rules: UpdateRules) -> None:
    """Refuse an update addressed to another federation, or an envelope that is not an update."""
    if metadata.federation != rules.federation:
        raise UpdateRejected(ReasonCode.WRONG_FEDERATION,
                             f"update is for federation {metadata.federation!r}; this hub runs {rules.federation!r}")
    if metadata.kind is not MessageKind.UPDATE:
        raise UpdateRejected(ReasonCode.MALFORMED, f"envelope kind {metadata.kind.value!r} is not an update")


def check_compatibility(metadata: EnvelopeMetadata, rules: UpdateRules, pins: FederationPins) -> None:
    """Refuse an update trained with another strategy, LoRA layout or base model."""
    if metadata.strategy != rules.strategy.name:
        raise UpdateRejected(ReasonCode.INCOMPATIBLE,
                             f"update uses strategy {metadata.strategy!r}; the federation uses "
                             f"{rules.strategy.name!r} (read it from the hub state's round_config)")  # fmt: skip
    if metadata.lora_config_hash != rules.lora_config_hash:
        raise UpdateRejected(ReasonCode.INCOMPATIBLE,
                             f"update's LoRA config hash {metadata.lora_config_hash[:16]}… differs from the "
                             f"federation's {rules.lora_config_hash[:16]}…; build the adapter from the 'lora' "
                             "settings in the hub state's round_config")  # fmt: skip
    if pins.base_fingerprint is not None and metadata.base_fingerprint != pins.base_fingerprint:
        raise UpdateRejected(ReasonCode.INCOMPATIBLE,
                             f"update was trained on base model {metadata.base_fingerprint}; the federation uses "
                             f"{pins.base_fingerprint}: load the same base model as the other clients")  # fmt: skip


class LayoutVerdicts:
    """Layouts (tensor names, shapes, dtypes) already found acceptable, so the layout checks
    run once per layout rather than once per update: every device of a federation sends the
    same layout, and those checks (key parsing, spec building, comparison) cost more than
    the update's arithmetic. Bounded; an intake keeps one (``decode_update(layouts=...)``).
    Only acceptances are kept: a refused layout is checked again, with the same message.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        # (layout, pinned spec JSON or None) -> the layout's pin JSON (what a first update pins)
        self._accepted: dict[tuple, str] = {}
        self._pinned: tuple[TensorSpec | None, str | None] = (None, None)

    def pinned_json(self, spec: TensorSpec | None) -> str | None:
        """``spec.to_json()``, remembered for the spec object last asked about (pins change rarely)."""
        if spec is None:
            return None
        if self._pinned[0] is not spec:
            self._pinned = (spec, spec.to_json())
        return self._pinned[1]

    def get(self, key: tuple) -> str | None:
        return self._accepted.get(key)

    def remember(self, key: tuple, layout_json: str) -> None:
        if len(self._accepted) >= self.capacity:
            self._accepted.clear()
        self._accepted[key] = layout_json


def decode_update(envelope: VerifiedEnvelope, rules: UpdateRules, pins: FederationPins,
                  layouts: LayoutVerdicts | None = None) -> DecodedUpdate:  # fmt: skip
    """Decode the body's tensors and check them against the strategy and the pinned layout.

    ``layouts``: layouts accepted before, whose checks need not run again (values are
    checked for every update)."""
    metadata = envelope.metadata
    if len(envelope.body) > rules.max_update_bytes:
        raise UpdateRejected(ReasonCode.TOO_LARGE, f"update body is {len(envelope.body)} bytes, over the hub's "
                                                   f"limit of {rules.max_update_bytes}")  # fmt: skip
    try:
        tensors, body_metadata = tensor_codec.decode(envelope.body, max_bytes=rules.max_update_bytes)
    except CodecError as error:
        raise UpdateRejected(ReasonCode.INVALID_UPDATE, f"update body is not valid safetensors: {error}") from None
    _check_body_metadata(metadata, body_metadata)
    pinned = layouts.pinned_json(pins.tensor_spec) if layouts is not None else (
        pins.tensor_spec.to_json() if pins.tensor_spec is not None else None)
    key = (tuple((name, array.shape, array.dtype.str) for name, array in tensors.items()), pinned)
    layout_json = layouts.get(key) if layouts is not None else None
    if layout_json is None:
        layout_json = _check_layout(tensors, rules.strategy, pins)
        if layouts is not None:
            layouts.remember(key, layout_json)
    new_pins: dict[str, str] = {}
    if pinned is None:
        new_pins[PIN_TENSOR_SPEC] = layout_json  # the first update sets the layout
    name = tensor_codec.first_non_finite(tensors)
    if name is not None:
        raise UpdateRejected(ReasonCode.INVALID_UPDATE,
                             f"update tensor {name!r} contains NaN or Inf; it is refused (did training diverge?); "
                             "every update of this federation must match its tensor layout")  # fmt: skip
    if pins.base_fingerprint is None:
        new_pins[PIN_BASE_FINGERPRINT] = metadata.base_fingerprint
    metrics = body_metadata.get("metrics")
    if metrics is not None and len(metrics) > _MAX_METRICS_CHARS:
        metrics = None  # informational only: too big to keep, not worth refusing the update
    return DecodedUpdate(tensors=tensors, metrics=metrics, new_pins=new_pins)


def _check_layout(tensors: Mapping[str, np.ndarray], strategy: Strategy, pins: FederationPins) -> str:
    """Refuse tensors this strategy's devices could not send, or that do not match the pinned
    layout; returns the layout as the pin JSON."""
    _check_shared_factors(tensors, strategy)
    try:
        # The strategy's layout: names, shapes, dtypes (without the rank where devices differ in it).
        layout = strategy.layout_spec(tensors)
        if pins.tensor_spec is not None:
            tensor_codec.check_layout(layout, pins.tensor_spec, what="update")
    except TensorMismatchError as error:
        raise UpdateRejected(ReasonCode.INVALID_UPDATE,
                             f"{error}; every update of this federation must match its tensor layout") from None
    for name, array in tensors.items():
        if array.dtype.kind != "f":
            raise UpdateRejected(ReasonCode.INVALID_UPDATE,
                                 f"update tensor {name!r} has dtype {array.dtype}; LoRA factors are floating point")
    return layout.to_json()


def _check_body_metadata(metadata: EnvelopeMetadata, body_metadata: Mapping[str, str]) -> None:
    """The signed envelope and the safetensors body repeat the same facts; they must agree."""
    for key, value in metadata.to_dict().items():
        if key in body_metadata and body_metadata[key] != str(value):
            raise UpdateRejected(ReasonCode.INVALID_UPDATE,
                                 f"update body metadata says {key}={body_metadata[key]!r} but the signed envelope "
                                 f"says {value!r}; the client must encode the same facts in both")  # fmt: skip
    if "metrics" in body_metadata:
        try:
            json.loads(body_metadata["metrics"])
        except ValueError:
            raise UpdateRejected(ReasonCode.INVALID_UPDATE, "update body metadata 'metrics' is not JSON") from None


def _check_shared_factors(tensors: Mapping[str, np.ndarray], strategy: Strategy) -> None:
    """Only the factors the strategy shares may arrive: a personal factor must never be accepted."""
    if not strategy.shared_factors:
        if tensors:
            raise UpdateRejected(ReasonCode.INVALID_UPDATE,
                                 f"strategy {strategy.name!r} shares no tensors, but the update carries "
                                 f"{len(tensors)} (e.g. {next(iter(tensors))!r}); send an update without tensors")
        return
    if not tensors:
        raise UpdateRejected(ReasonCode.INVALID_UPDATE, "update carries no tensors")
    problem = strategy.update_problem({name: array.shape for name, array in tensors.items()})
    if problem is not None:
        raise UpdateRejected(ReasonCode.INVALID_UPDATE, problem)
