"""``fedvlm-hub start`` as a real process: SIGKILL mid-round and resume, SIGTERM and a clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest

from fedvlm.hub.clients import register_client
from fedvlm.hub.status import read_status
from fedvlm.hub.store import HubStore
from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import Presence, RoundPhase
from tests.brokers import MosquittoProcess, RunningBroker, free_port, wait_for_port
from tests.hub.fake_clients import FakeClient, b_factors, fetch_global, weighted_mean


def start_hub(state_dir: Path, log_path: Path, *arguments: str) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "fedvlm.hub.cli", "start", "--federation", "fed",
                                 "--state-dir", str(state_dir), *arguments],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        log.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


@pytest.mark.parametrize("broker_kind", ["embedded", "mosquitto"])
def test_hub_killed_mid_round_resumes_it_counting_each_update_once(tmp_path: Path, broker_kind: str):
    """With mosquitto the broker outlives the hub; with the embedded broker it dies with
    the hub, and clients reconnect to the restarted one."""
    state_dir, log_path = tmp_path / "state", tmp_path / "hub.log"
    secrets = {name: register_client(state_dir, name) for name in ("a", "b", "c")}
    # The embedded broker stops with the hub: it lingers (until every client has gone) so that
    # the global can still be fetched from it after the round; mosquitto outlives the hub.
    linger = "0" if broker_kind == "mosquitto" else "30"
    arguments = ("--rounds", "1", "--min-clients", "3", "--round-timeout", "60", "--linger", linger)
    mosquitto = None
    if broker_kind == "mosquitto":
        mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
        broker = mosquitto.broker
        arguments += ("--broker", broker.url)
    else:
        broker = RunningBroker("embedded", "127.0.0.1", free_port())
        arguments += ("--port", str(broker.port))
    hub = start_hub(state_dir, log_path, *arguments)
    wait_for_port(broker.host, broker.port, timeout=30)
    clients = [FakeClient(broker, "fed", name, secret).connect() for name, secret in secrets.items()]
    a, b, c = clients
    try:
        a.wait_collecting(1, timeout=30)
        updates = {"a": (b_factors(1), 3), "b": (b_factors(2), 5), "c": (b_factors(3), 11)}
        a_envelope = a.envelope(updates["a"][0], 1, updates["a"][1])
        assert a.wait_ack(a.publish(a_envelope)).accepted
        b_message = b.send(updates["b"][0], 1, updates["b"][1])
        assert b.wait_ack(b_message).accepted

        hub.send_signal(signal.SIGKILL)
        hub.wait(timeout=10)
        assert not read_status(state_dir).hub_running
        with HubStore.in_state_dir(state_dir, create=False) as store:
            assert [r.client_id for r in store.receipts(1)] == ["a", "b"]

        hub = start_hub(state_dir, log_path, *arguments)
        if mosquitto is not None:
            # The restarted hub re-acknowledges what it had accepted (that ack may have been
            # lost); b's session on mosquitto is up all along, so it receives it.
            again = b.wait_ack(b_message, timeout=30)
            assert again.accepted and again.round == 1
        for client in clients:  # with the embedded broker: once they have reconnected
            client.wait_state(lambda s: s.status is Presence.ONLINE and s.phase is RoundPhase.COLLECTING,
                              timeout=30)  # fmt: skip
        assert a.wait_ack(a.publish(a_envelope)).accepted  # a re-sends: acknowledged, not counted twice
        assert c.wait_ack(c.send(updates["c"][0], 1, updates["c"][1])).accepted

        a.wait_state(lambda s: s.global_version == 1, timeout=20)
        _, payload = fetch_global(broker, "fed")
        tensors = tensor_codec.decode(payload)[0]
        expected = weighted_mean(list(updates.values()))
        for name in expected:
            np.testing.assert_allclose(tensors[name], expected[name], rtol=1e-5, atol=1e-6)
        if mosquitto is None:
            for client in clients:  # the lingering hub exits once every client has gone
                client.close()
        assert hub.wait(timeout=20) == 0  # one round requested, done: the hub exits by itself
        with HubStore.in_state_dir(state_dir, create=False) as store:
            assert [(r.round, r.attempt, r.outcome) for r in store.rounds()] == [(1, 1, "aggregated")]
            assert sorted(r.client_id for r in store.receipts(1)) == ["a", "b", "c"]
        if mosquitto is not None:  # the broker outlives the hub: its last state is there
            final = a.wait_state(lambda s: s.status is Presence.OFFLINE)
            assert final.phase is RoundPhase.DONE
    finally:
        for client in clients:
            client.close()
        stop(hub)
        if mosquitto is not None:
            mosquitto.stop()


def test_sigterm_publishes_the_offline_state_and_exits_cleanly(tmp_path: Path):
    state_dir, port = tmp_path / "state", free_port()
    register_client(state_dir, "a")
    hub = start_hub(state_dir, tmp_path / "hub.log", "--port", str(port), "--min-clients", "2")
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        watcher = FakeClient(RunningBroker("embedded", "127.0.0.1", port), "fed", "a", None).connect()
        watcher.wait_state(lambda s: s.status is Presence.ONLINE and s.phase is RoundPhase.WAITING)
        # The hub publishes its state, then records it in SQLite: allow it a moment.
        deadline = time.monotonic() + 10
        while not read_status(state_dir).hub_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_status(state_dir).hub_running
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=20) == 0
        assert watcher.wait_state(lambda s: s.status is Presence.OFFLINE).phase is RoundPhase.WAITING
        watcher.close(announce_offline=False)
        status = read_status(state_dir)
        assert not status.hub_running and status.last_state.status is Presence.OFFLINE
        assert "Traceback" not in (tmp_path / "hub.log").read_text()
    finally:
        stop(hub)
    assert os.stat(state_dir / "hub.sqlite3").st_mode & 0o077 == 0
