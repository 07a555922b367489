"""Topic names: building, parsing back, id validation, delivery flags and ACL patterns."""

from __future__ import annotations

import pytest

from fedvlm.shared.protocol import (
    DELIVERY,
    MAX_ID_LENGTH,
    ProtocolError,
    ReasonCode,
    TopicKind,
    Topics,
    parse_topic,
    validate_client_id,
)

MESSAGE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.fixture
def topics():
    return Topics("lab-7")


def test_topic_names(topics):
    assert topics.hub_state() == "fedvlm/v1/lab-7/hub/state"
    assert topics.global_manifest() == "fedvlm/v1/lab-7/global/manifest"
    assert topics.global_chunk(12, 0) == "fedvlm/v1/lab-7/global/12/chunk/0"
    assert topics.global_chunks_filter(12) == "fedvlm/v1/lab-7/global/12/chunk/+"
    assert topics.client_announce("cam_01") == "fedvlm/v1/lab-7/clients/cam_01/announce"
    assert topics.client_announcements_filter() == "fedvlm/v1/lab-7/clients/+/announce"
    assert topics.client_ack("cam_01") == "fedvlm/v1/lab-7/clients/cam_01/ack"
    assert topics.client_selection("cam_01") == "fedvlm/v1/lab-7/clients/cam_01/selection"
    assert topics.update("cam_01", MESSAGE_ID) == f"fedvlm/v1/lab-7/updates/cam_01/{MESSAGE_ID.hex()}"
    assert topics.updates_filter() == "fedvlm/v1/lab-7/updates/+/+"
    assert topics.shared_updates_filter("hub-workers") == "$share/hub-workers/fedvlm/v1/lab-7/updates/+/+"


def test_parse_inverts_build(topics):
    cases = [
        (topics.hub_state(), TopicKind.HUB_STATE, {}),
        (topics.global_manifest(), TopicKind.GLOBAL_MANIFEST, {}),
        (topics.global_chunk(12, 305), TopicKind.GLOBAL_CHUNK, {"version": 12, "chunk_index": 305}),
        (topics.client_announce("c.1"), TopicKind.CLIENT_ANNOUNCE, {"client_id": "c.1"}),
        (topics.client_ack("c.1"), TopicKind.CLIENT_ACK, {"client_id": "c.1"}),
        (topics.client_selection("c.1"), TopicKind.CLIENT_SELECTION, {"client_id": "c.1"}),
        (topics.update("c.1", MESSAGE_ID), TopicKind.UPDATE, {"client_id": "c.1", "message_id": MESSAGE_ID}),
    ]
    for topic, kind, fields in cases:
        parsed = topics.parse(topic)
        assert parsed.kind is kind and parsed.federation == "lab-7"
        for name in ("client_id", "version", "chunk_index", "message_id"):
            assert getattr(parsed, name) == fields.get(name), (topic, name)


def test_every_kind_has_delivery_flags():
    assert set(DELIVERY) == set(TopicKind)
    retained = {kind for kind, delivery in DELIVERY.items() if delivery.retain}
    assert retained == {TopicKind.HUB_STATE, TopicKind.GLOBAL_MANIFEST, TopicKind.GLOBAL_CHUNK,
                        TopicKind.CLIENT_ANNOUNCE, TopicKind.CLIENT_SELECTION}  # fmt: skip
    assert DELIVERY[TopicKind.UPDATE].qos == 1


@pytest.mark.parametrize(
    ("topic", "reason", "match"),
    [
        ("other/v1/lab-7/hub/state", ReasonCode.MALFORMED, "does not start with"),
        ("fedvlm/v2/lab-7/hub/state", ReasonCode.UNSUPPORTED_VERSION, "uses topic tree 'v2'; this FedVLM uses v1"),
        ("fedvlm/v1/lab-7/hub/mood", ReasonCode.MALFORMED, "unknown path 'hub/mood'"),
        ("fedvlm/v1/lab-7/global/007/chunk/1", ReasonCode.MALFORMED, "leading zeros"),
        ("fedvlm/v1/lab-7/global/7/chunk/-1", ReasonCode.MALFORMED, "leading zeros"),
        ("fedvlm/v1/lab-7/updates/c1/XYZ", ReasonCode.MALFORMED, "32 lowercase hex"),
        ("fedvlm/v1/lab-7/updates/c1", ReasonCode.MALFORMED, "unknown path"),
        ("fedvlm/v1/lab-7/clients/c 1/ack", ReasonCode.MALFORMED, "contains ' '"),
        ("fedvlm/v1/$SYS/hub/state", ReasonCode.MALFORMED, "starts with '\\$'"),
    ],
)
def test_parse_refuses_foreign_topics(topic, reason, match):
    with pytest.raises(ProtocolError, match=match) as caught:
        parse_topic(topic)
    assert caught.value.reason is reason


def test_parse_refuses_another_federation(topics):
    with pytest.raises(ProtocolError, match="belongs to federation 'other'") as caught:
        topics.parse(Topics("other").hub_state())
    assert caught.value.reason is ReasonCode.WRONG_FEDERATION


@pytest.mark.parametrize(
    ("client_id", "match"),
    [
        ("a/b", "contains '/'"),
        ("a+", "contains '\\+'"),
        ("#", "contains '#'"),
        ("", "is empty"),
        ("x" * (MAX_ID_LENGTH + 1), f"limit is {MAX_ID_LENGTH}"),
        ("-leading", "starts with '-'"),
        ("caf\u00e9", "contains 'é'"),
        (42, "must be a string"),
    ],
)
def test_client_id_validation(topics, client_id, match):
    with pytest.raises(ProtocolError, match=match):
        topics.client_ack(client_id)
    with pytest.raises(ProtocolError):
        validate_client_id(client_id)


@pytest.mark.parametrize("federation", ["", "fed/1", "fed#", "$share", "x" * 65, None])
def test_federation_id_validation(federation):
    with pytest.raises(ProtocolError, match="federation id"):
        Topics(federation)


def test_ids_at_the_limits_are_fine():
    assert validate_client_id("A" * MAX_ID_LENGTH) == "A" * MAX_ID_LENGTH
    assert Topics("f").client_ack("0.a_b-C") == "fedvlm/v1/f/clients/0.a_b-C/ack"


@pytest.mark.parametrize(("version", "index"), [(-1, 0), (0, -1), (True, 0), (1.0, 0)])
def test_chunk_topic_numbers_must_be_non_negative_ints(topics, version, index):
    with pytest.raises(ProtocolError, match="non-negative integer"):
        topics.global_chunk(version, index)


def test_update_topic_needs_a_16_byte_message_id(topics):
    with pytest.raises(ProtocolError, match="16 bytes"):
        topics.update("c1", b"\x00" * 15)


def test_client_permissions_cover_its_own_topics_only(topics):
    permissions = topics.client_permissions("c1")
    assert permissions.publish == ("fedvlm/v1/lab-7/clients/c1/announce", "fedvlm/v1/lab-7/updates/c1/+")
    assert topics.client_ack("c1") in permissions.subscribe
    assert topics.client_ack("c2") not in permissions.subscribe
    assert not any("updates" in pattern for pattern in permissions.subscribe)
    assert topics.hub_permissions().publish == ("fedvlm/v1/lab-7/#",)
