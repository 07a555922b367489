"""The hub SIGKILLed while updates stream in, restarted on its state dir, devices that never re-send.

Half the updates are acknowledged, the other half are on their way (some being judged,
some still with the broker) when the hub dies. Nothing the hub had not committed was
acknowledged to the broker (manual acknowledgements), so mosquitto delivers it again to
the restarted hub's persistent session, whose handlers are in place before it resumes.
The round must complete with every update counted exactly once, and the global version
must be the sample-weighted mean of all of them. Real hub processes, real mosquitto.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedvlm.hub.clients import register_clients
from fedvlm.hub.store import HubStore
from fedvlm.shared import tensor_codec
from fedvlm.shared.mqtt_link import MqttLink
from fedvlm.shared.protocol import Ack, Topics
from tests.brokers import MosquittoProcess
from tests.hub.fake_clients import FakeClient, b_factors, weighted_mean

DEVICES = 120


def _start_hub(state_dir: Path, log_path: Path, broker_url: str) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fedvlm.hub.cli", "start", "--federation", "fed",
                                 "--state-dir", str(state_dir), "--broker", broker_url, "--rounds", "1",
                                 "--min-clients", str(DEVICES), "--round-timeout", "120", "--linger", "0",
                                 "--quiet"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class AckTap:
    """Counts the hub's accepting acks per device (a separate connection, like an observer)."""

    def __init__(self, broker) -> None:
        self.accepted: set[str] = set()
        self.lock = threading.Lock()
        self.link = MqttLink(broker.address, "ack-tap", protocol=broker.protocol, persistent_session=False)
        self.link.subscribe("fedvlm/v1/fed/clients/+/ack", self._on_ack)
        self.link.connect(10)

    def _on_ack(self, topic: str, payload: bytes, retained: bool) -> None:
        ack = Ack.from_json(payload)
        if ack.accepted:
            with self.lock:
                self.accepted.add(ack.client_id)

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_hub_killed_with_half_the_updates_acknowledged_completes_the_round_counting_each_once(tmp_path: Path):
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    state_dir, log_path = tmp_path / "state", tmp_path / "hub.log"
    ids = [f"dev-{i:03d}" for i in range(DEVICES)]
    secrets = register_clients(state_dir, ids)
    hub = _start_hub(state_dir, log_path, mosquitto.broker.url)
    tap = AckTap(mosquitto.broker)
    clients = [FakeClient(mosquitto.broker, "fed", client_id, secrets[client_id]) for client_id in ids]
    updates = {client_id: (b_factors(100 + i, out_features=32), 1 + i % 9) for i, client_id in enumerate(ids)}
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda client: client.connect(), clients))
        state = clients[0].wait_collecting(1, timeout=60)
        for client in clients:
            client.wait_selected(state, timeout=30)
        envelopes = {c.client_id: c.envelope(*updates[c.client_id][:1], 1, updates[c.client_id][1]) for c in clients}
        half = DEVICES // 2

        def send(client: FakeClient) -> None:  # once: these devices never send again
            client.publish(envelopes[client.client_id], chunk_size=1024)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(send, clients[:half]))
        _wait(lambda: tap.count() >= half, 60, "half the updates to be acknowledged")
        # The second half streams in; the hub is frozen (SIGSTOP, at once) while it works
        # through it, so it dies holding updates it received and had not judged, then killed.
        with ThreadPoolExecutor(16) as pool:
            sending = pool.map(send, clients[half:])
            _wait(lambda: tap.count() > half, 60, "the hub to judge some of the second half")
            hub.send_signal(signal.SIGSTOP)
            list(sending)  # every device has handed its update to the broker once
        hub.send_signal(signal.SIGKILL)
        hub.wait(timeout=10)
        acknowledged_at_kill = tap.count()
        with HubStore.in_state_dir(state_dir, create=False) as store:
            committed_at_kill = len(store.receipts(1))
        print(f"\nkilled with {acknowledged_at_kill} of {DEVICES} acknowledged, {committed_at_kill} committed")
        assert half <= acknowledged_at_kill < DEVICES and committed_at_kill < DEVICES

        hub = _start_hub(state_dir, log_path, mosquitto.broker.url)
        assert hub.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        with HubStore.in_state_dir(state_dir, create=False) as store:
            receipts = store.receipts(1)
            latest = store.latest_global()
            assert latest is not None and latest.published
            published, _ = tensor_codec.decode(Path(latest.file_path).read_bytes())
            assert store.rejection_counts().get("duplicate", 0) == 0
        assert sorted(receipt.client_id for receipt in receipts) == ids  # all of them, each once
        expected = weighted_mean(list(updates.values()))
        for name, value in expected.items():
            np.testing.assert_allclose(published[name], value, rtol=1e-5, atol=1e-6)
        _wait(lambda: tap.count() == DEVICES, 10, "every device to hear it was accepted")
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait(timeout=10)
        for client in clients:
            client.close(announce_offline=False)
        tap.link.close()
        mosquitto.stop()
