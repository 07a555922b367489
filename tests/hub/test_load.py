"""200 devices with multi-chunk updates against a hub with room to reassemble only 8.

Real mosquitto (its own config, free port), a real hub, 200 devices each on its own MQTT
connection from this process. The hub refuses what it cannot reassemble now as
``overloaded`` with a retry hint; each device waits as the edge SDK does (RetryBackoff)
and sends the same message again. Every update must be accepted exactly once, and the
global version must be the sample-weighted mean of all 200.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedvlm.hub.clients import register_clients
from fedvlm.hub.config import HubConfig
from fedvlm.hub.console import Console
from fedvlm.hub.service import HubService
from fedvlm.hub.store import HubStore
from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import MIN_CHUNK_SIZE, ReasonCode, RetryBackoff, new_message_id
from tests.brokers import MosquittoProcess
from tests.hub.fake_clients import FakeClient, b_factors, weighted_mean

DEVICES = 200
SLOTS = 8


def _take_part(client: FakeClient, index: int, tensors, samples: int) -> int:
    """One device: wait for its selection, send, and on ``overloaded`` back off and send the
    same message again. Returns how many times it was refused."""
    state = client.wait_collecting(1, timeout=60)
    client.wait_selected(state)
    envelope = client.envelope(tensors, 1, samples)
    assert len(envelope) > 3 * MIN_CHUNK_SIZE  # several chunks each
    message_id = new_message_id()
    backoff = RetryBackoff(rng=random.Random(index))
    while True:
        client.publish(envelope, message_id=message_id)
        ack = client.wait_ack(message_id, timeout=60)
        if ack.accepted:
            return backoff.refusals
        assert ack.reason_code is ReasonCode.OVERLOADED and ack.retry_after_s, ack
        time.sleep(backoff.next_delay(ack.retry_after_s))


def test_two_hundred_multi_chunk_updates_beyond_reassembly_room_are_each_accepted_once(tmp_path: Path):
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    state_dir = tmp_path / "hub"
    ids = [f"dev-{i:03d}" for i in range(DEVICES)]
    secrets = register_clients(state_dir, ids)
    config = HubConfig(federation="fed", state_dir=state_dir, broker=mosquitto.broker.url, min_clients=DEVICES,
                       rounds=1, round_timeout_s=120.0, done_linger_s=0.0, reassembly_slots=SLOTS)  # fmt: skip
    hub = HubService(config, console=Console(enabled=False)).start()
    clients = [FakeClient(mosquitto.broker, "fed", client_id, secrets[client_id]) for client_id in ids]
    updates = {client_id: (b_factors(i, out_features=96), 5 + i % 7) for i, client_id in enumerate(ids)}
    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda client: client.connect(), clients))
        with ThreadPoolExecutor(DEVICES) as pool:
            refusals = list(pool.map(lambda pair: _take_part(pair[1], pair[0], *updates[pair[1].client_id]),
                                     enumerate(clients)))  # fmt: skip
        assert hub.wait_finished(60)
        with HubStore.in_state_dir(state_dir, create=False) as store:
            receipts = store.receipts(1)
            overloaded = store.rejection_counts().get("overloaded", 0)
            latest = store.latest_global()
            published, _ = tensor_codec.decode(Path(latest.file_path).read_bytes())
        print(f"\n{DEVICES} devices, {SLOTS} reassembly slots: {sum(refusals)} overloaded refusals, "
              f"most for one device {max(refusals)}")
        assert overloaded == sum(refusals) > 0  # the room really was too small, and it did not matter
        assert sorted(receipt.client_id for receipt in receipts) == ids  # every device once
        assert not (state_dir / "updates").exists() or not any((state_dir / "updates").rglob("*"))
        expected = weighted_mean(list(updates.values()))
        for name, value in expected.items():
            np.testing.assert_allclose(published[name], value, rtol=1e-5, atol=1e-6)
    finally:
        for client in clients:
            client.close(announce_offline=False)
        hub.stop()
        mosquitto.stop()
