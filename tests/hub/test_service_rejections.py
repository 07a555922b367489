"""Every kind of bad update is refused with its reason, and the hub goes on to finish the round."""

from __future__ import annotations

import numpy as np

from fedvlm.hub.status import read_status
from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import MIN_CHUNK_SIZE, Ack, ReasonCode, RoundPhase, new_client_secret, split_payload
from tests.hub.fake_clients import FakeClient, a_factors, b_factors, fetch_global, lora_key, weighted_mean


def refused(client: FakeClient, message_id: bytes, reason: ReasonCode) -> Ack:
    ack = client.wait_ack(message_id)
    assert (ack.accepted, ack.reason_code) == (False, reason), ack
    assert ack.reason_text  # a person can read why
    return ack


def test_each_rejection_gets_its_reason_and_the_round_still_completes(start_federation, broker_kind):
    federation = start_federation(broker_kind, min_clients=2, fraction=0.5, rounds=1,
                                  max_update_bytes=48 * 1024)  # fmt: skip
    a, b = federation.connect("a", "b")
    state = a.wait_collecting(1)
    assert state.selected_count == 2 and a.wait_selected(state) and b.wait_selected(state)
    (c,) = federation.connect("c")  # online, but the round already has its clients

    # The first accepted update pins the federation's tensor layout and base model.
    a_update = (b_factors(1), 4)
    a_envelope = a.envelope(a_update[0], 1, a_update[1])
    first_id = a.publish(a_envelope)
    assert a.wait_ack(first_id).accepted

    # Re-sending the same bytes (new or same message id) is acknowledged again, counted once.
    assert a.wait_ack(a.publish(a_envelope)).accepted
    again = a.wait_ack(a.publish(a_envelope, message_id=first_id))
    assert again.accepted and again.message_id == first_id.hex()
    refused(a, a.send(b_factors(99), 1, 4), ReasonCode.DUPLICATE)

    # Authentication: wrong secret, unregistered signer, someone else's topic.
    refused(b, b.send(b_factors(2), 1, secret=new_client_secret()), ReasonCode.BAD_SIGNATURE)
    ghost = FakeClient(federation.broker, "fed", "ghost", new_client_secret()).connect()
    federation.clients["ghost"] = ghost
    refused(ghost, ghost.send(b_factors(3), 1), ReasonCode.UNKNOWN_CLIENT)
    refused(b, a.publish(a.envelope(b_factors(5), 1), topic_client="b"), ReasonCode.CLIENT_MISMATCH)
    junk = b"\x00garbage" * 300
    refused(b, b.publish(junk), ReasonCode.MALFORMED)

    # Addressing: another federation, a closed or future round, a client not selected.
    refused(b, b.send(b_factors(2), 1, federation="other-fed"), ReasonCode.WRONG_FEDERATION)
    refused(b, b.send(b_factors(2), 0), ReasonCode.WRONG_ROUND)
    refused(b, b.send(b_factors(2), 2), ReasonCode.WRONG_ROUND)
    refused(c, c.send(b_factors(2), 1), ReasonCode.NOT_SELECTED)

    # Compatibility: strategy, LoRA layout, base model.
    refused(b, b.send(b_factors(2), 1, strategy="fedit"), ReasonCode.INCOMPATIBLE)
    refused(b, b.send(b_factors(2), 1, lora_hash="0" * 64), ReasonCode.INCOMPATIBLE)
    refused(b, b.send(b_factors(2), 1, base_fingerprint="another-base"), ReasonCode.INCOMPATIBLE)

    # Tensors that do not match the pinned layout, or hold NaN/Inf.
    good = b_factors(2)
    names = dict(good)
    names[lora_key(5, "q_proj", "B")] = names.pop(lora_key(0, "q_proj", "B"))
    shapes = {**good, lora_key(0, "q_proj", "B"): np.zeros((7, 4), np.float32)}
    dtypes = {name: array.astype(np.float64) for name, array in good.items()}
    with_nan = {**good, lora_key(0, "v_proj", "B"): np.full((6, 4), np.nan, np.float32)}
    with_inf = {**good, lora_key(0, "v_proj", "B"): np.full((6, 4), np.inf, np.float32)}
    missing = {lora_key(0, "q_proj", "B"): good[lora_key(0, "q_proj", "B")]}
    for tensors, words in ((names, "lacks tensor"), (shapes, "shape"), (dtypes, "dtype"), (with_nan, "NaN"),
                           (with_inf, "NaN or Inf"), (missing, "lacks tensor")):  # fmt: skip
        assert words in refused(b, b.send(tensors, 1), ReasonCode.INVALID_UPDATE).reason_text
    # pLoRA's personal factor must never be accepted, even alongside valid B's.
    leak = refused(b, b.send({**good, **a_factors(2)}, 1), ReasonCode.INVALID_UPDATE)
    assert "lora_A" in leak.reason_text
    mismatch = refused(b, b.send(good, 1, body_metadata={"round": "7"}), ReasonCode.INVALID_UPDATE)
    assert "round" in mismatch.reason_text

    # Bigger than max_update_bytes: refused from its first chunk.
    huge = {**good, lora_key(0, "q_proj", "B"): np.ones((6, 4), np.float32)}
    huge[lora_key(9, "q_proj", "B")] = np.ones((64, 256), np.float32)
    refused(b, b.send(huge, 1), ReasonCode.TOO_LARGE)

    # After all that, a good update from b completes the round with each client counted once.
    b_update = (good, 6)
    assert b.wait_ack(b.send(b_update[0], 1, b_update[1])).accepted
    a.wait_state(lambda s: s.global_version == 1 and s.phase is RoundPhase.DONE)
    _, payload = fetch_global(federation.broker, "fed")
    expected = weighted_mean([a_update, b_update])
    tensors = tensor_codec.decode(payload)[0]
    for name in expected:
        np.testing.assert_allclose(tensors[name], expected[name], rtol=1e-5, atol=1e-6)

    # A closed round: an accepted update re-sent is still acknowledged; a new one is stale.
    assert a.wait_ack(a.publish(a_envelope)).accepted
    refused(c, c.send(b_factors(4), 1), ReasonCode.WRONG_ROUND)

    status = read_status(federation.config.state_dir)
    assert status.accepted_updates == 2
    assert status.rejections == {
        "bad_signature": 1, "client_mismatch": 1, "duplicate": 1, "incompatible": 3, "invalid_update": 8,
        "malformed": 1, "not_selected": 1, "too_large": 1, "unknown_client": 1, "wrong_federation": 1,
        "wrong_round": 3,
    }  # fmt: skip


def test_a_secret_is_never_logged_or_published(start_federation, capsys):
    federation = start_federation(min_clients=1, clients=("a",), rounds=1)
    (a,) = federation.connect("a")
    a.wait_collecting(1)
    a.wait_ack(a.send(b_factors(1), 1, secret=new_client_secret()))
    assert a.wait_ack(a.send(b_factors(1), 1)).accepted
    a.wait_state(lambda s: s.phase is RoundPhase.DONE)
    output = capsys.readouterr()
    assert federation.secrets["a"] not in output.out + output.err
    assert all(federation.secrets["a"] not in state.to_json().decode() for state in a.states)


def test_chunks_on_the_wrong_topic_are_refused(start_federation):
    federation = start_federation(min_clients=1, clients=("a",))
    (a,) = federation.connect("a")
    a.wait_collecting(1)
    envelope = a.envelope(b_factors(1), 1)
    (chunk,) = split_payload(envelope, chunk_size=64 * 1024)
    wrong_topic = a.topics.update("a", b"\x01" * 16)
    a.link.publish(wrong_topic, chunk)
    ack = a.wait_ack()
    assert (ack.accepted, ack.reason_code, ack.message_id) == (False, ReasonCode.MALFORMED, "01" * 16)


def test_an_update_refused_for_timing_is_judged_again_when_sent_again(start_federation):
    """"Not now" is not remembered as the message's verdict: the same message id sent again
    once its round is open is accepted (a permanent verdict is answered from memory)."""
    federation = start_federation("embedded", clients=("a", "b"), min_clients=2, rounds=2)
    a, b = federation.connect("a", "b")
    a.wait_collecting(1)
    early = a.envelope(b_factors(7), 2, 4)
    early_id = a.publish(early)
    refused(a, early_id, ReasonCode.WRONG_ROUND)
    for client, seed in ((a, 1), (b, 2)):
        assert client.wait_ack(client.send(b_factors(seed), 1, 4)).accepted
    a.wait_collecting(2)
    again = a.wait_ack(a.publish(early, message_id=early_id))
    assert again.accepted and again.message_id == early_id.hex()
    # A content verdict stays: the same bad message sent again under its id is answered from
    # memory, not judged (and counted) a second time.
    bad = b.envelope({lora_key(0, "q_proj", "B"): np.full((6, 4), np.nan, np.float32)}, 2)
    bad_id = b.publish(bad)
    refused(b, bad_id, ReasonCode.INVALID_UPDATE)
    counted = read_status(federation.config.state_dir).rejections["invalid_update"]
    refused(b, b.publish(bad, message_id=bad_id), ReasonCode.INVALID_UPDATE)
    assert read_status(federation.config.state_dir).rejections["invalid_update"] == counted


def test_a_strangers_message_is_judged_once_the_client_is_registered(start_federation):
    """Refused as unknown once per message, but not blacklisted: after ``clients add`` the
    same message id sent again is reassembled and judged."""
    from fedvlm.hub.clients import register_client

    federation = start_federation("embedded", clients=("a", "b"), min_clients=2)
    a, _ = federation.connect("a", "b")
    a.wait_collecting(1)
    newcomer = FakeClient(federation.broker, "fed", "newcomer", new_client_secret()).connect()
    federation.clients["newcomer"] = newcomer
    message_id = newcomer.send(b_factors(4), 1)
    refused(newcomer, message_id, ReasonCode.UNKNOWN_CLIENT)
    newcomer.secret = register_client(federation.config.state_dir, "newcomer")
    again = newcomer.wait_ack(newcomer.publish(newcomer.envelope(b_factors(4), 1), message_id=message_id))
    assert again.reason_code is ReasonCode.NOT_SELECTED  # judged now: registered, but not in this round


def test_an_upload_in_another_protocol_version_is_answered_once(start_federation):
    """Every chunk of an older device's upload fails the version check: the device gets one
    answer telling it to upgrade, and the hub records one rejection, not one per chunk."""
    from fedvlm.shared.protocol import PROTOCOL_VERSION, new_message_id

    federation = start_federation("embedded", clients=("a", "b"), min_clients=2)
    a, _ = federation.connect("a", "b")
    a.wait_collecting(1)
    message_id = new_message_id()
    padded = a.envelope(b_factors(3), 1, body_metadata={"pad": "x" * 5000})
    chunks = split_payload(padded, chunk_size=1024, message_id=message_id)
    assert len(chunks) > 3
    topic = a.topics.update("a", message_id)
    for chunk in chunks:
        older = chunk[:4] + (PROTOCOL_VERSION - 1).to_bytes(2, "big") + chunk[6:]
        a.link.publish(topic, older, qos=1)
    ack = refused(a, message_id, ReasonCode.UNSUPPORTED_VERSION)
    assert "upgrade" in ack.reason_text
    assert read_status(federation.config.state_dir).rejections == {"unsupported_version": 1}
    assert a.wait_ack(a.send(b_factors(3), 1)).accepted  # today's protocol from the same device: fine
    assert read_status(federation.config.state_dir).rejections == {"unsupported_version": 1}


def test_a_late_partial_copy_of_a_committed_update_is_answered_from_its_receipt(start_federation):
    """A copy of an accepted update that the hub's short memories (verdicts, finished messages)
    have forgotten, arriving in part (a broker redelivery after a reconnect): it takes no
    reassembly slot, and its last chunk is answered "accepted" from the committed receipt."""
    federation = start_federation("mosquitto", min_clients=2, rounds=1)
    a, b = federation.connect("a", "b")
    a.wait_selected(a.wait_collecting(1))
    envelope = a.envelope(b_factors(1), 1, 4, body_metadata={"note": "x" * 4 * MIN_CHUNK_SIZE})  # several chunks
    message_id = a.publish(envelope)
    assert a.wait_ack(message_id).accepted  # committed: acks follow the group commit
    intake = federation.hub._intake
    intake._recent_acks.clear()  # as if 1,024 other updates had come since (the hub is idle now)
    intake._reassembler._finished.clear()
    chunks = split_payload(envelope, chunk_size=MIN_CHUNK_SIZE, message_id=message_id)
    assert len(chunks) >= 3
    topic = a.topics.update("a", message_id)
    a.link.publish(topic, chunks[0], qos=1)  # the copy's first chunk, then its last: no middle
    a.link.publish(topic, chunks[-1], qos=1)
    again = a.wait_ack(message_id)
    assert again.accepted and again.round == 1
    assert intake._reassembler.pending_message_count == 0
    # Other bytes under the same message id (a device reusing an id) are not taken for a copy:
    # their last chunk states another digest, so they are judged, and refused as a duplicate.
    other = a.envelope(b_factors(2), 1, 4, body_metadata={"note": "y" * 4 * MIN_CHUNK_SIZE})
    refused(a, a.publish(other, message_id=message_id), ReasonCode.DUPLICATE)
    assert len(federation.hub._require_store().receipts(1)) == 1  # still counted once
