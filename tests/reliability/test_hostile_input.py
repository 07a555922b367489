"""Hostile input beyond the fuzzer's reach: attacks on the hub's reassembly limits.

The fuzzer (test_fuzz.py) keeps its partial messages under the hub's pending limit so
its expected counts do not depend on timing; these tests aim at the limits themselves.
Strangers are refused before reassembly, one sender holds only a few pending slots, and
memory follows the bytes that arrived, not the sizes headers declare.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from benchmarks.fuzz_hub import HubProcess, _header
from fedvlm.hub.clients import register_client
from fedvlm.shared.mqtt_link import MqttLink
from fedvlm.shared.protocol import MIN_CHUNK_SIZE, ReasonCode, split_payload
from tests.brokers import RunningBroker, free_port, wait_for_port
from tests.hub.fake_clients import FakeClient, b_factors

MESSAGES = 70  # more than the hub's 64 pending messages


def test_stray_duplicates_of_a_message_refused_for_timing_do_not_hold_reassembly_slots(start_federation):
    """A QoS 1 redelivery of one chunk of a message the hub already answered must not start
    a new message that never completes: 70 of them would fill the 64 pending slots and
    refuse every honest update as ``overloaded`` until the reassembly timeout."""
    federation = start_federation(clients=("a", "b"), min_clients=2, round_timeout_s=120.0)
    a, b = federation.connect("a", "b")
    a.wait_collecting(1)
    for _ in range(MESSAGES):
        # Round 2 has not opened: refused as wrong_round, a verdict that depends on timing.
        envelope = a.envelope(b_factors(1), 2, body_metadata={"pad": "p" * 2000})  # several chunks
        message_id = os.urandom(16)
        chunks = split_payload(envelope, chunk_size=MIN_CHUNK_SIZE, message_id=message_id)
        assert len(chunks) >= 2
        topic = a.topics.update("a", message_id)
        for chunk in chunks:
            a.link.publish(topic, chunk, qos=1)
        assert a.wait_ack(message_id).reason_code is ReasonCode.WRONG_ROUND
        a.link.publish(topic, chunks[0], qos=1)  # the stray duplicate
    ack = b.wait_ack(b.send(b_factors(2), 1, 10))
    assert ack.accepted, ack


@pytest.mark.parametrize("topic_client", ["nobody", "a"])
def test_no_one_sender_can_block_honest_updates(start_federation, topic_client):
    """Neither a stranger nor someone publishing on a registered client's topic (no ACL, no
    secret needed: the HMAC is only checked at completion) can take the reassembly room
    other clients need: by message count or by declared bytes."""
    federation = start_federation(clients=("a", "b"), min_clients=2, round_timeout_s=120.0)
    a, b = federation.connect("a", "b")
    a.wait_collecting(1)
    attacker = MqttLink(federation.broker.address, "attacker", protocol=federation.broker.protocol,
                        persistent_session=False).connect(10)  # fmt: skip
    declared_max = 256 * 1024 * 1024  # the default max_update_bytes
    try:
        for index in range(MESSAGES):  # first chunks of messages that never complete
            message_id = os.urandom(16)
            # Alternate small messages (to use up slots) with ones declaring the largest size
            # (4 of which would use up the hub's whole byte budget without a per-sender share).
            total = MIN_CHUNK_SIZE + 10 if index % 5 == 4 else declared_max
            chunk = _header(message_id, 0, -(-total // MIN_CHUNK_SIZE), MIN_CHUNK_SIZE, total) + bytes(MIN_CHUNK_SIZE)
            attacker.publish(a.topics.update(topic_client, message_id), chunk, qos=1)
        time.sleep(1.0)
        ack = b.wait_ack(b.send(b_factors(2), 1, 10))
        assert ack.accepted, ack
    finally:
        attacker.close()


@pytest.mark.parametrize("topic_client", ["nobody", "a"])
def test_declared_sizes_do_not_inflate_hub_memory(tmp_path, topic_client):
    """Memory follows the bytes that arrived: first chunks declaring 256 MiB each, from a
    stranger or on a registered client's topic, do not make the hub allocate it."""
    state_dir, port = tmp_path / "state", free_port()
    secrets = {name: register_client(state_dir, name) for name in ("a", "b")}
    hub = HubProcess(state_dir, tmp_path / "hub.log", ["--port", str(port), "--min-clients", "2"])
    clients = []
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        broker = RunningBroker("embedded", "127.0.0.1", port)
        clients = [FakeClient(broker, "fuzz", name, secret).connect() for name, secret in secrets.items()]
        clients[0].wait_collecting(1, timeout=30)
        before = hub.status()["VmRSS"]
        attacker = MqttLink(broker.address, "attacker", protocol="3.1.1", persistent_session=False).connect(10)
        total = 256 * 1024 * 1024  # the default max_update_bytes
        for _ in range(4):
            message_id = os.urandom(16)
            chunk = _header(message_id, 0, total // MIN_CHUNK_SIZE, MIN_CHUNK_SIZE, total) + bytes(MIN_CHUNK_SIZE)
            attacker.publish(clients[0].topics.update(topic_client, message_id), chunk, qos=1)
        time.sleep(2.0)
        attacker.close()
        grown_mib = (hub.status()["VmRSS"] - before) / 1024
        assert grown_mib < 256, f"hub RSS grew by {grown_mib:.0f} MiB from 4 chunks of 1 KiB"
    finally:
        for client in clients:
            client.close(announce_offline=False)
        if hub.alive:
            hub.process.send_signal(signal.SIGKILL)
        hub.stop()
