"""Update checks without MQTT: pinning, shared factors only, body/envelope agreement."""

from __future__ import annotations

import numpy as np
import pytest

from fedvlm.hub.updates import (
    PIN_BASE_FINGERPRINT,
    PIN_TENSOR_SPEC,
    FederationPins,
    LayoutVerdicts,
    UpdateRejected,
    UpdateRules,
    check_compatibility,
    decode_update,
)
from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import EnvelopeMetadata, ReasonCode, VerifiedEnvelope
from fedvlm.shared.strategies import get_strategy
from tests.hub.fake_clients import a_factors, b_factors


def envelope(tensors, *, strategy="plora", body_metadata=None, base="base-1") -> VerifiedEnvelope:
    metadata = EnvelopeMetadata(federation="fed", round=1, client_id="a", sample_count=3, strategy=strategy,
                                base_fingerprint=base, lora_config_hash="h" * 64)  # fmt: skip
    body = tensor_codec.encode(tensors, {**{k: str(v) for k, v in metadata.to_dict().items()}, **(body_metadata or {})})
    return VerifiedEnvelope("a", metadata, body)


def rules(strategy="plora", max_bytes=1 << 20) -> UpdateRules:
    return UpdateRules("fed", get_strategy(strategy), "h" * 64, max_bytes)


def test_the_first_update_pins_layout_and_base_model_and_later_ones_must_match():
    decoded = decode_update(envelope(b_factors(1)), rules(), FederationPins())
    assert set(decoded.new_pins) == {PIN_BASE_FINGERPRINT, PIN_TENSOR_SPEC}
    pins = FederationPins().updated(decoded.new_pins)
    assert pins.base_fingerprint == "base-1" and set(pins.tensor_spec) == set(b_factors(1))
    assert decode_update(envelope(b_factors(2)), rules(), pins).new_pins == {}
    with pytest.raises(UpdateRejected) as caught:
        decode_update(envelope(b_factors(2, rank=8)), rules(), pins)
    assert caught.value.reason is ReasonCode.INVALID_UPDATE and "shape" in caught.value.text
    with pytest.raises(UpdateRejected, match="base model base-2"):
        check_compatibility(envelope(b_factors(2), base="base-2").metadata, rules(), pins)


def test_a_remembered_layout_skips_only_the_layout_checks():
    """With the layouts an intake remembers, later updates of that layout still have their
    values checked, and another layout, or the same one against new pins, is checked afresh."""
    layouts = LayoutVerdicts()
    first = decode_update(envelope(b_factors(1)), rules(), FederationPins(), layouts)
    again = decode_update(envelope(b_factors(2)), rules(), FederationPins(), layouts)
    assert again.new_pins[PIN_TENSOR_SPEC] == first.new_pins[PIN_TENSOR_SPEC]
    poisoned = {name: np.full_like(value, np.nan) for name, value in b_factors(3).items()}
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        decode_update(envelope(poisoned), rules(), FederationPins(), layouts)
    last = list(b_factors(3))[-1]  # only the last tensor is poisoned: every tensor is checked, and named
    for bad in (np.inf, -np.inf, np.nan):
        partly = {name: value.copy() for name, value in b_factors(3).items()}
        partly[last][1, 2] = bad
        with pytest.raises(UpdateRejected, match=f"{last!r} contains NaN or Inf"):
            decode_update(envelope(partly), rules(), FederationPins(), layouts)
    # Finite values whose float32 sum overflows are finite: accepted (the exact check decides).
    huge = {name: np.full_like(value, 3e38) for name, value in b_factors(3).items()}
    decode_update(envelope(huge), rules(), FederationPins(), layouts)
    pins = FederationPins().updated(first.new_pins)
    with pytest.raises(UpdateRejected, match="shape"):
        decode_update(envelope(b_factors(2, rank=8)), rules(), pins, layouts)
    with pytest.raises(UpdateRejected, match="lora_A"):  # A is personal under pLoRA, remembered or not
        decode_update(envelope({**b_factors(1), **a_factors(1)}), rules(), FederationPins(), layouts)
    other_pins = FederationPins().updated({PIN_TENSOR_SPEC: tensor_codec.TensorSpec.of(b_factors(1, rank=8)).to_json()})
    with pytest.raises(UpdateRejected, match="shape"):  # the remembered layout, against other pins
        decode_update(envelope(b_factors(4)), rules(), other_pins, layouts)


@pytest.mark.parametrize("strategy, tensors, accepted", [
    ("plora", lambda: {**b_factors(1), **a_factors(1)}, False),  # A is personal under pLoRA
    ("fedsa", lambda: b_factors(1), False),  # B is personal under FedSA
    ("fedsa", lambda: a_factors(1), True),
    ("fedit", lambda: {**b_factors(1), **a_factors(1)}, True),
    ("plora", lambda: {"some.other.weight": np.ones(3, np.float32)}, False),
    ("local", lambda: {}, True),
    ("local", lambda: b_factors(1), False),
    ("plora", lambda: {}, False),
])  # fmt: skip
def test_only_the_strategys_shared_factors_are_accepted(strategy, tensors, accepted):
    update = envelope(tensors(), strategy=strategy)
    if accepted:
        decode_update(update, rules(strategy), FederationPins())
    else:
        with pytest.raises(UpdateRejected) as caught:
            decode_update(update, rules(strategy), FederationPins())
        assert caught.value.reason is ReasonCode.INVALID_UPDATE


def test_body_metadata_must_agree_with_the_signed_envelope_and_metrics_are_kept():
    with pytest.raises(UpdateRejected, match="sample_count"):
        decode_update(envelope(b_factors(1), body_metadata={"sample_count": "300"}), rules(), FederationPins())
    with pytest.raises(UpdateRejected, match="metrics"):
        decode_update(envelope(b_factors(1), body_metadata={"metrics": "{not json"}), rules(), FederationPins())
    decoded = decode_update(envelope(b_factors(1), body_metadata={"metrics": '{"loss": 0.5}'}), rules(),
                            FederationPins())  # fmt: skip
    assert decoded.metrics == '{"loss": 0.5}'


def test_bodies_over_the_limit_or_not_safetensors_are_refused():
    with pytest.raises(UpdateRejected) as caught:
        decode_update(envelope(b_factors(1)), rules(max_bytes=100), FederationPins())
    assert caught.value.reason is ReasonCode.TOO_LARGE
    garbage = VerifiedEnvelope("a", envelope({}).metadata, b"\x05" * 40)
    with pytest.raises(UpdateRejected, match="not valid safetensors"):
        decode_update(garbage, rules(), FederationPins())
