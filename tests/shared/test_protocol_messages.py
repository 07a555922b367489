"""JSON control messages: round trips, defaults, unknown fields, and validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedvlm.shared.protocol import (
    PROTOCOL_VERSION,
    MAX_CONTROL_MESSAGE_BYTES,
    Ack,
    Announcement,
    EnvelopeMetadata,
    GlobalManifest,
    HubState,
    MessageKind,
    Presence,
    ProtocolError,
    ReasonCode,
    RoundPhase,
    Selection,
)

HUB_STATE = HubState(federation="fed", status=Presence.ONLINE, round=3, phase=RoundPhase.COLLECTING, global_version=2,
                     selected_count=2, deadline=1_700_000_000.5,
                     round_config={"local_steps": 20, "lr": 1e-4, "lora": {"r": 8, "targets": ["q_proj"]}})  # fmt: skip
MANIFEST = GlobalManifest(federation="fed", version=2, round=2, strategy="plora", payload_sha256="0f" * 32,
                          total_size=600_000, chunk_count=3, chunk_size=262_070, base_fingerprint="0123abcd",
                          lora_config_hash="e" * 64, created_at=1_700_000_000)  # fmt: skip
ANNOUNCEMENT = Announcement(client_id="c1", status=Presence.ONLINE, sdk_version="0.1.0", last_round=2)
ACK = Ack.reject("c1", 3, b"\xab" * 16, ReasonCode.LATE, "round 3 closed at its deadline; wait for round 4")
SELECTION = Selection(federation="fed", client_id="c1", round=3, attempt=1, deadline=1_700_000_000.5)
OVERLOADED = Ack.reject("c1", None, b"\x01" * 16, ReasonCode.OVERLOADED, "busy", retry_after_s=2.5)
METADATA = EnvelopeMetadata(federation="fed", round=3, client_id="c1", sample_count=64, strategy="plora",
                            base_fingerprint="0123abcd", lora_config_hash="e" * 64)  # fmt: skip


@pytest.mark.parametrize("message", [HUB_STATE, MANIFEST, ANNOUNCEMENT, ACK, METADATA, Ack.accept("c2", 0, bytes(16)),
                                     SELECTION, OVERLOADED])
def test_json_round_trip(message):
    data = message.to_json()
    assert json.loads(data)["type"] == type(message).MESSAGE_TYPE
    assert type(message).from_json(data) == message
    assert type(message).from_json(data.decode()) == message


def test_values_are_normalised_when_built_from_plain_json_types():
    state = HubState("fed", "online", 0, "waiting", 0, selected_count=1, deadline=5)
    assert state.status is Presence.ONLINE and state.phase is RoundPhase.WAITING
    assert state.selected_count == 1 and isinstance(state.deadline, float)
    assert MANIFEST.created_at == 1_700_000_000.0


def test_optional_fields_default_and_unknown_fields_are_ignored():
    wire = {"type": "announcement", "client_id": "c9", "status": "offline", "sdk_version": "0.2.0",
            "capabilities": ["cuda"]}  # fmt: skip
    announcement = Announcement.from_json(json.dumps(wire).encode())
    assert announcement.last_round is None and announcement.status is Presence.OFFLINE
    state = HubState.from_json(b'{"type":"hub_state","federation":"f","status":"online","round":0,'
                               b'"phase":"waiting","global_version":0}')  # fmt: skip
    assert state.selected_count == 0 and state.deadline is None and state.round_config == {}
    assert state.protocol_version == PROTOCOL_VERSION


def test_last_wills_are_offline_copies():
    assert HUB_STATE.went_offline() == dataclasses.replace(HUB_STATE, status=Presence.OFFLINE)
    assert ANNOUNCEMENT.went_offline().status is Presence.OFFLINE


def test_message_on_the_wrong_topic_is_refused():
    with pytest.raises(ProtocolError, match="wrong topic") as caught:
        HubState.from_json(MANIFEST.to_json())
    assert caught.value.reason is ReasonCode.MALFORMED


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"type":"hub_state","federation":"f","status":"online","round":0,"phase":"waiting"}',
         "lacks the required field 'global_version'"),
        (b'{"type":"hub_state","federation":"f","status":"online","round":0,"phase":"w","global_version":0}',
         "HubState.phase must be one of"),
        (b'{"type":"hub_state","federation":"f","status":"online","round":-1,"phase":"done","global_version":0}',
         "HubState.round must be at least 0"),
        (b'{"type":"hub_state","federation":"f","status":"online","round":true,"phase":"done","global_version":0}',
         "HubState.round must be an integer"),
        (b'{"type":"hub_state","federation":"f","status":"online","round":0,"phase":"done","global_version":0,'
         b'"deadline":NaN}', "not valid UTF-8 JSON"),
        (b'{"type":"hub_state","federation":"f/x","status":"online","round":0,"phase":"done","global_version":0}',
         "HubState.federation is invalid"),
    ],
)
def test_from_json_errors_say_what_is_wrong(data, match):
    with pytest.raises(ProtocolError, match=match) as caught:
        HubState.from_json(data)
    assert caught.value.reason is ReasonCode.MALFORMED


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: dataclasses.replace(HUB_STATE, selected_count=-1), "selected_count must be at least 0"),
        (lambda: dataclasses.replace(SELECTION, attempt=0), "attempt must be at least 1"),
        (lambda: dataclasses.replace(SELECTION, client_id="$SYS"), "client_id is invalid"),
        (lambda: dataclasses.replace(OVERLOADED, retry_after_s=-1.0), "retry_after_s must be a number"),
        (lambda: dataclasses.replace(HUB_STATE, deadline=float("inf")), "finite"),
        (lambda: dataclasses.replace(HUB_STATE, round_config={"x": object()}), "only JSON values"),
        (lambda: dataclasses.replace(HUB_STATE, round_config={"x": float("nan")}), "only JSON values"),
        (lambda: dataclasses.replace(MANIFEST, chunk_count=4), "600000 bytes in chunks of 262070 make 3"),
        (lambda: dataclasses.replace(MANIFEST, chunk_size=10), "chunk_size must be at least"),
        (lambda: dataclasses.replace(MANIFEST, payload_sha256="0F" * 32), "64 lowercase hex digits"),
        (lambda: dataclasses.replace(MANIFEST, strategy="p lora"), "no spaces"),
        (lambda: dataclasses.replace(ANNOUNCEMENT, last_round=1.0), "last_round must be an integer"),
        (lambda: dataclasses.replace(ANNOUNCEMENT, status="away"), "'online', 'offline'"),
        (lambda: dataclasses.replace(ACK, accepted=True), "use 'accepted' exactly when"),
        (lambda: dataclasses.replace(ACK, accepted=1), "must be true or false"),
        (lambda: dataclasses.replace(ACK, reason_code="gone"), "reason_code must be one of"),
        (lambda: dataclasses.replace(ACK, message_id="xyz"), "32 lowercase hex digits"),
        (lambda: dataclasses.replace(ACK, reason_text="x" * 5000), "limit is 2000"),
        (lambda: dataclasses.replace(METADATA, sample_count=0), "sample_count must be at least 1"),
        (lambda: dataclasses.replace(METADATA, kind="gradient"), "kind must be one of 'update'"),
        (lambda: dataclasses.replace(METADATA, client_id=""), "client id is empty"),
    ],
)
def test_invalid_fields_are_refused_when_built(build, match):
    with pytest.raises(ProtocolError, match=match):
        build()


def test_reason_code_round_trips_by_value():
    ack = Ack.from_json(ACK.to_json())
    assert ack.reason_code is ReasonCode.LATE and not ack.accepted and ack.message_id == "ab" * 16
    assert METADATA.kind is MessageKind.UPDATE


def test_oversized_control_message_is_refused_both_ways():
    huge = dataclasses.replace(HUB_STATE, round_config={"blob": "x" * MAX_CONTROL_MESSAGE_BYTES})
    with pytest.raises(ProtocolError, match="select fewer clients") as caught:
        huge.to_json()
    assert caught.value.reason is ReasonCode.TOO_LARGE
    with pytest.raises(ProtocolError) as caught:
        HubState.from_json(b" " * (MAX_CONTROL_MESSAGE_BYTES + 1))
    assert caught.value.reason is ReasonCode.TOO_LARGE


def test_round_config_is_a_copy():
    config = {"lr": 1e-4}
    state = dataclasses.replace(HUB_STATE, round_config=config)
    config["lr"] = 1.0
    assert state.round_config == {"lr": 1e-4}


def test_a_selection_matches_only_the_attempt_the_hub_collects():
    collecting = dataclasses.replace(HUB_STATE, round_config={"attempt": 1})
    assert SELECTION.matches(collecting)
    assert not SELECTION.matches(dataclasses.replace(collecting, round_config={"attempt": 2}))
    assert not SELECTION.matches(dataclasses.replace(collecting, round=4))
    assert not SELECTION.matches(dataclasses.replace(collecting, phase=RoundPhase.AGGREGATING))
