"""Faults with real processes and real brokers: a client killed mid-upload, the hub killed
with SIGKILL at each phase, the broker restarted mid-round, a device whose disk fails
mid-save.

Recovery times after SIGKILL are printed (``pytest -s``) for docs/reliability.md, never
asserted: this machine's load decides them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedvlm.edge.device_state import DeviceState, load_state, save_state
from fedvlm.hub.clients import register_client
from fedvlm.hub.status import read_status
from fedvlm.hub.store import HubStore
from fedvlm.shared import tensor_codec
from fedvlm.shared.mqtt_link import MqttLink
from fedvlm.shared.protocol import GlobalManifest, Presence, RoundPhase, Topics
from tests.brokers import MosquittoProcess
from tests.hub.fake_clients import FakeClient, b_factors, fetch_global, weighted_mean

ROOT = Path(__file__).resolve().parents[2]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _assert_close(tensors, expected) -> None:
    assert set(tensors) == set(expected)
    for name in expected:
        np.testing.assert_allclose(tensors[name], expected[name], rtol=1e-5, atol=1e-6)


# ============================================================ a client killed mid-upload
_HALF_UPLOAD = textwrap.dedent("""
    import sys, time
    from fedvlm.shared.protocol import MIN_CHUNK_SIZE, new_message_id, split_payload
    from tests.brokers import RunningBroker
    from tests.hub.fake_clients import FakeClient, b_factors
    port, secret = int(sys.argv[1]), sys.argv[2]
    client = FakeClient(RunningBroker("embedded", "127.0.0.1", port), "fed", "c", secret).connect()
    client.wait_collecting(1)
    envelope = client.envelope(b_factors(3), 1, 10, body_metadata={"notes": "n" * 6000})
    message_id = new_message_id()
    chunks = split_payload(envelope, chunk_size=MIN_CHUNK_SIZE, message_id=message_id)
    for chunk in chunks[: len(chunks) // 2]:
        client.link.publish(client.topics.update("c", message_id), chunk, qos=1)
    print(f"sent {len(chunks) // 2} of {len(chunks)} chunks", flush=True)
    time.sleep(3600)
""")


def test_a_client_killed_mid_upload_is_discarded_after_the_timeout_and_the_round_completes(start_federation):
    # The reassembly timeout is the round timeout (when shorter than 600 s): 6 s here.
    federation = start_federation(clients=("a", "b", "c"), min_clients=3, rounds=1, round_timeout_s=6.0)
    a, b = federation.connect("a", "b")
    uploader = subprocess.Popen([sys.executable, "-c", _HALF_UPLOAD, str(federation.broker.port),
                                 federation.secrets["c"]], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert uploader.stdout.readline().startswith("sent ")  # half its chunks are at the hub
        uploader.send_signal(signal.SIGKILL)  # the device dies mid-upload
        uploader.wait(timeout=10)
    finally:
        if uploader.poll() is None:
            uploader.kill()
    honest = [(b_factors(1), 4), (b_factors(2), 6)]
    for client, (tensors, weight) in zip((a, b), honest):
        assert client.wait_ack(client.send(tensors, 1, weight)).accepted
    a.wait_state(lambda s: s.global_version == 1, timeout=30)  # at the deadline, 2 of 3 (the quorum)
    _assert_close(tensor_codec.decode(fetch_global(federation.broker, "fed")[1])[0], weighted_mean(honest))
    _wait(lambda: read_status(federation.config.state_dir).rejections.get("expired") == 1, 20,
          "the partial upload to expire")  # fmt: skip
    status = read_status(federation.config.state_dir)
    assert status.rejections == {"expired": 1}  # the partial message, discarded once, nothing else
    (dropped,) = status.recent_rejections
    assert dropped.client_id == "c" and "of" in dropped.detail  # "... with k of n chunks received"
    with HubStore.in_state_dir(federation.config.state_dir, create=False) as store:
        assert sorted(r.client_id for r in store.receipts(1)) == ["a", "b"]


# ============================================================ the hub killed at each phase
def _start_hub(state_dir: Path, log_path: Path, arguments: list[str], pause_at: str | None) -> subprocess.Popen:
    """``fedvlm-hub start``; with ``pause_at``, one that freezes at that checkpoint (paused_hub.py)."""
    hub = ["-m", "fedvlm.hub.cli"] if pause_at is None else [str(Path(__file__).with_name("paused_hub.py")), pause_at]
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, *hub, "start", "--federation", "fed", "--state-dir", str(state_dir),
                                 *arguments], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip


class ManifestWatcher:
    """Every global manifest the broker delivers, across hub restarts (mosquitto outlives the hub)."""

    def __init__(self, broker) -> None:
        self.manifests: list[GlobalManifest] = []
        self._lock = threading.Lock()
        self.link = MqttLink(broker.address, "manifest-watcher", protocol=broker.protocol,
                             persistent_session=False).connect(10)  # fmt: skip
        self.link.subscribe(Topics("fed").global_manifest(), self._on_manifest)

    def _on_manifest(self, topic, payload, retained) -> None:
        if payload:
            with self._lock:
                self.manifests.append(GlobalManifest.from_json(payload))

    def contents_by_version(self) -> dict[int, set[str]]:
        with self._lock:
            found: dict[int, set[str]] = {}
            for manifest in self.manifests:
                found.setdefault(manifest.version, set()).add(manifest.payload_sha256)
            return found


@pytest.mark.parametrize("phase", ["collecting", "aggregating", "publishing"])
def test_hub_killed_at_each_phase_restarts_consistent(tmp_path, phase):
    """collecting: 2 of 3 updates accepted; aggregating: all 3 accepted, no version yet;
    publishing: version 1 committed, its chunks and manifest out, not yet marked published."""
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    state_dir, log_path = tmp_path / "state", tmp_path / "hub.log"
    secrets = {name: register_client(state_dir, name) for name in ("a", "b", "c")}
    arguments = ["--broker", mosquitto.broker.url, "--rounds", "2", "--min-clients", "3", "--round-timeout", "60",
                 "--quiet"]  # fmt: skip
    hub = _start_hub(state_dir, log_path, arguments, None if phase == "collecting" else phase)
    watcher = ManifestWatcher(mosquitto.broker)
    clients = {name: FakeClient(mosquitto.broker, "fed", name, secret).connect() for name, secret in secrets.items()}
    a = clients["a"]
    try:
        a.wait_collecting(1, timeout=30)
        updates = {1: {"a": (b_factors(1), 3), "b": (b_factors(2), 5), "c": (b_factors(3), 11)},
                   2: {"a": (b_factors(4), 2), "b": (b_factors(5), 7), "c": (b_factors(6), 1)}}  # fmt: skip
        envelopes = {name: clients[name].envelope(t, 1, w) for name, (t, w) in updates[1].items()}
        senders = ("a", "b") if phase == "collecting" else ("a", "b", "c")
        for name in senders:
            assert clients[name].wait_ack(clients[name].publish(envelopes[name])).accepted
        if phase != "collecting":
            _wait(lambda: f"paused at {phase}" in log_path.read_text(), 30, f"the hub to reach {phase}")
        hub.send_signal(signal.SIGKILL)
        hub.wait(timeout=10)
        with HubStore.in_state_dir(state_dir, create=False) as store:
            assert sorted(r.client_id for r in store.receipts(1)) == sorted(senders)  # acked = on disk
            before = {v.version: v.sha256 for v in store.global_versions()}
        assert before == ({1: before[1]} if phase == "publishing" else {})

        states_seen = len(a.states)
        restarted = time.monotonic()
        hub = _start_hub(state_dir, log_path, arguments, None)
        if phase == "collecting":  # serving again: the resumed round is collecting
            a.wait_state(lambda s: len(a.states) > states_seen and s.status is Presence.ONLINE
                         and s.phase is RoundPhase.COLLECTING, timeout=60)  # fmt: skip
        else:  # the round it was closing is closed: version 1 published
            a.wait_state(lambda s: s.status is Presence.ONLINE and s.global_version >= 1, timeout=60)
        recovery = time.monotonic() - restarted
        print(f"\nrecovery after SIGKILL while {phase}: {recovery:.2f} s (restart -> "
              f"{'round resumed' if phase == 'collecting' else 'version 1 published'})")
        if phase == "collecting":
            assert a.wait_ack(a.publish(envelopes["a"])).accepted  # a re-send: acknowledged, counted once
            assert clients["c"].wait_ack(clients["c"].publish(envelopes["c"])).accepted
        a.wait_state(lambda s: s.phase is RoundPhase.COLLECTING and s.round == 2, timeout=30)
        for name, (tensors, weight) in updates[2].items():
            assert clients[name].wait_ack(clients[name].send(tensors, 2, weight)).accepted
        a.wait_state(lambda s: s.phase is RoundPhase.DONE and s.global_version == 2, timeout=30)
        assert hub.wait(timeout=30) == 0

        with HubStore.in_state_dir(state_dir, create=False) as store:
            for round_number in (1, 2):  # every accepted update once, none lost
                assert sorted(r.client_id for r in store.receipts(round_number)) == ["a", "b", "c"]
            assert [(r.round, r.attempt, r.outcome) for r in store.rounds()] == [(1, 1, "aggregated"),
                                                                              (2, 1, "aggregated")]
            versions = store.global_versions()
            assert [(v.version, v.round, v.published) for v in versions] == [(1, 1, True), (2, 2, True)]
            files = {v.version: Path(v.file_path).read_bytes() for v in versions}
            shas = {v.version: v.sha256 for v in versions}
        if phase == "publishing":
            assert shas[1] == before[1]  # the committed version was republished, not recomputed
        # No version went out twice with different contents, and what went out is what is stored.
        assert watcher.contents_by_version() == {version: {sha} for version, sha in shas.items()}
        for version, payload in files.items():
            assert tensor_codec.sha256_hex(payload) == shas[version]
            _assert_close(tensor_codec.decode(payload)[0], weighted_mean(list(updates[version].values())))
        manifest, payload = fetch_global(mosquitto.broker, "fed")
        assert manifest.version == 2 and tensor_codec.sha256_hex(payload) == shas[2]
    finally:
        for client in clients.values():
            client.close(announce_offline=False)
        watcher.link.close()
        if hub.poll() is None:
            hub.kill()
        hub.wait(timeout=10)
        mosquitto.stop()


# ============================================================ the broker restarted mid-round
def test_broker_restarted_mid_round_hub_and_clients_reconnect_and_the_round_completes(tmp_path):
    """tests/test_edge_client.py restarts the broker between rounds with real edge clients
    and an in-process hub; here the hub is a process and the restart falls inside a round,
    after one of three updates was accepted."""
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    state_dir = tmp_path / "state"
    secrets = {name: register_client(state_dir, name) for name in ("a", "b", "c")}
    hub = _start_hub(state_dir, tmp_path / "hub.log", ["--broker", mosquitto.broker.url, "--rounds", "1",
                                                       "--min-clients", "3", "--round-timeout", "120"], None)
    clients = {name: FakeClient(mosquitto.broker, "fed", name, secret).connect() for name, secret in secrets.items()}
    a = clients["a"]
    try:
        a.wait_collecting(1, timeout=30)
        updates = {"a": (b_factors(1), 3), "b": (b_factors(2), 5), "c": (b_factors(3), 11)}
        a_envelope = a.envelope(updates["a"][0], 1, updates["a"][1])
        assert a.wait_ack(a.publish(a_envelope)).accepted

        states_seen = len(a.states)
        mosquitto.stop()  # nothing retained survives: persistence is off
        mosquitto.start()
        # The hub reconnects by itself and republishes its state (the retained one was lost).
        a.wait_state(lambda s: len(a.states) > states_seen and s.phase is RoundPhase.COLLECTING, timeout=60)
        assert hub.poll() is None
        for name in ("b", "c"):
            client = clients[name]
            assert client.wait_ack(client.send(updates[name][0], 1, updates[name][1]), timeout=30).accepted
        assert a.wait_ack(a.publish(a_envelope), timeout=30).accepted  # re-sent: counted once
        a.wait_state(lambda s: s.global_version == 1, timeout=30)
        _assert_close(tensor_codec.decode(fetch_global(mosquitto.broker, "fed")[1])[0],
                      weighted_mean(list(updates.values())))  # fmt: skip
        assert hub.wait(timeout=30) == 0
        with HubStore.in_state_dir(state_dir, create=False) as store:
            assert sorted(r.client_id for r in store.receipts(1)) == ["a", "b", "c"]
    finally:
        for client in clients.values():
            client.close(announce_offline=False)
        if hub.poll() is None:
            hub.kill()
        hub.wait(timeout=10)
        mosquitto.stop()


# ============================================================ a device whose disk fails mid-save
_SAVE_WITH_FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from fedvlm.edge.device_state import DeviceState, save_state
    limit = int(sys.argv[2])
    state = DeviceState(federation="fed", client_id="c0", strategy="plora", base_fingerprint="abc", lora={"r": 4},
                        round=2, global_version=2, personal={"m.lora_A.weight": np.full((64, 64), 2.0, np.float32)},
                        global_state={"m.lora_B.weight": np.full((64, 64), -2.0, np.float32)}, metrics=[])
    # A real write failure, as on a full disk: past the limit write() fails with EFBIG
    # (SIGXFSZ ignored, so it is an error rather than a kill).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        save_state(sys.argv[1], state)
    except Exception as error:  # safetensors reports the failed write as its own SafetensorError
        print("save failed:", type(error).__name__, error, flush=True)
        sys.exit(3)
    print("saved")
""")


@pytest.mark.parametrize("limit", [0, 4096, 16_400])  # fails at the first byte, mid-file, at the last bytes
def test_a_device_whose_disk_write_fails_mid_save_keeps_its_previous_state(tmp_path, limit):
    state_dir = tmp_path / "device"
    previous = DeviceState(federation="fed", client_id="c0", strategy="plora", base_fingerprint="abc", lora={"r": 4},
                           round=1, global_version=1,
                           personal={"m.lora_A.weight": np.full((64, 64), 1.0, np.float32)},
                           global_state={"m.lora_B.weight": np.full((64, 64), -1.0, np.float32)}, metrics=[])
    save_state(state_dir, previous)
    result = subprocess.run([sys.executable, "-c", _SAVE_WITH_FILE_SIZE_LIMIT, str(state_dir), str(limit)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert "File too large" in result.stdout  # EFBIG: the write itself failed
    survivor = load_state(state_dir)
    assert survivor.round == 1 and survivor.global_version == 1
    np.testing.assert_array_equal(survivor.personal["m.lora_A.weight"], previous.personal["m.lora_A.weight"])
    np.testing.assert_array_equal(survivor.global_state["m.lora_B.weight"], previous.global_state["m.lora_B.weight"])
    # With the disk back, the next save commits and replaces the half-written snapshot.
    previous.round = 3
    save_state(state_dir, previous)
    assert load_state(state_dir).round == 3
