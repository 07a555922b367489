"""The edge client against a real hub: late join from retained messages, broker restarts."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from fedvlm.edge.device_state import load_state
from fedvlm.edge.edge_client import EdgeClient, EdgeClientError
from fedvlm.edge.training import TrainingConfig
from fedvlm.hub.clients import register_client
from fedvlm.hub.config import HubConfig
from fedvlm.hub.console import Console
from fedvlm.hub.service import HubService
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.lora_keys import factor_of
from tests.brokers import MosquittoProcess

QUICK = TrainingConfig(steps=2, batch_size=4, learning_rate=1e-2, progress=False)


def _client(tmp_path, model_dir, federation, name, secret, broker, data):
    return EdgeClient(model_dir, data.train, broker.url, "fed", name, secret, tmp_path / "devices" / name,
                      eval_examples=data.test[:4], training=QUICK, quantization="none")


def _hub(tmp_path, broker, **settings) -> HubService:
    settings.setdefault("lora", LoraSettings(r=4, alpha=8))
    config = HubConfig(federation="fed", state_dir=tmp_path / "hub", broker=broker.url, round_timeout_s=60,
                       done_linger_s=0, **settings)
    return HubService(config, console=Console(enabled=False)).start()


def _run_in_threads(clients, **kwargs):
    errors = []

    def run(client):
        try:
            client.run(timeout=120, **kwargs)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    return threads, errors


def _run_to_the_end(clients, hub: HubService) -> None:
    """Run the devices until the hub's rounds are done, then stop the hub."""
    threads, errors = _run_in_threads(clients)
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert hub.wait_finished(timeout=30)
    hub.stop()


def test_late_device_gets_the_global_version_from_retained_messages(tmp_path, tiny_model_dir, tiny_federation):
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        secrets = {name: register_client(tmp_path / "hub", name) for name in ("a", "b", "late")}
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=2)
        data = tiny_federation.clients
        early = [_client(tmp_path, tiny_model_dir, "fed", n, secrets[n], mosquitto.broker, data[i])
                 for i, n in enumerate(("a", "b"))]
        _run_to_the_end(early, hub)

        # The hub is gone; the broker still holds its retained state, manifest and chunks.
        late = _client(tmp_path, tiny_model_dir, "fed", "late", secrets["late"], mosquitto.broker, data[0])
        late.run(timeout=60)
        state = load_state(tmp_path / "devices" / "late")
        assert state.global_version == 1 and state.round == 0  # absorbed, never trained
        global_b = load_state(tmp_path / "devices" / "a").global_state
        shared = late.model.shared_update()
        assert set(shared) == set(global_b) and all(factor_of(k) == "B" for k in shared)
        assert all(np.array_equal(shared[k], global_b[k]) for k in shared)
    finally:
        mosquitto.stop()


def test_devices_and_hub_reconnect_after_a_broker_restart(tmp_path, tiny_model_dir, tiny_federation):
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        secrets = {name: register_client(tmp_path / "hub", name) for name in ("a", "b")}
        hub = _hub(tmp_path, mosquitto.broker, rounds=2, min_clients=2)
        data = tiny_federation.clients
        clients = [_client(tmp_path, tiny_model_dir, "fed", n, secrets[n], mosquitto.broker, data[i])
                   for i, n in enumerate(("a", "b"))]
        threads, errors = _run_in_threads(clients)
        # Restart the broker (same port, nothing retained: persistence is off) once round 1 is in.
        deadline_hit = not _wait_until(lambda: all(c.state and c.state.round >= 1 for c in clients), 120)
        assert not deadline_hit, "round 1 never completed"
        mosquitto.stop()
        mosquitto.start()
        for thread in threads:
            thread.join(timeout=240)
        assert not errors, errors
        assert hub.wait_finished(timeout=60)
        hub.stop()
        for name in ("a", "b"):
            state = load_state(tmp_path / "devices" / name)
            assert state.round == 2 and state.global_version == 2
    finally:
        mosquitto.stop()


def test_a_device_with_a_wrong_secret_stops_with_a_clear_error(tmp_path, tiny_model_dir, tiny_federation):
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        register_client(tmp_path / "hub", "b")
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=1)
        data = tiny_federation.clients
        device = _client(tmp_path, tiny_model_dir, "fed", "b", "not-the-secret-the-hub-issued", mosquitto.broker,
                         data[1])
        with pytest.raises(EdgeClientError, match="bad_signature"):
            device.run(timeout=120)
        hub.stop()
    finally:
        mosquitto.stop()


def _wait_until(condition, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_device_killed_before_its_ack_resends_and_keeps_what_it_trained(tmp_path, tiny_model_dir, tiny_federation):
    """A device SIGKILLed after publishing, before any ack, re-sends the identical update when
    it comes back, and commits the personal factors that update was trained with (not the
    ones from before the crash)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import hashlib
    import json

    from fedvlm.hub.store import HubStore
    from fedvlm.shared import tensor_codec
    from fedvlm.shared.protocol import seal_envelope
    from tests.hub.fake_clients import FakeClient

    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    device = None
    try:
        secrets = {name: register_client(tmp_path / "hub", name) for name in ("a", "b")}
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=2)
        # Both online, so round 1 opens with both selected; then the hub goes away, so the
        # device's update is published but never acknowledged.
        stand_ins = [FakeClient(mosquitto.broker, "fed", name, secrets[name]).connect() for name in ("a", "b")]
        stand_ins[0].wait_collecting(1)
        hub.stop()
        for stand_in in stand_ins:
            stand_in.close(announce_offline=False)

        data_dir, state_dir = tmp_path / "data", tmp_path / "devices" / "a"
        tiny_federation.write(data_dir)
        (tmp_path / "a.secret").write_text(secrets["a"])
        bin_dir = Path(sys.executable).parent
        device = subprocess.Popen(
            [str(bin_dir / "fedvlm-edge"), "join", "--hub", mosquitto.broker.url, "--federation", "fed",
             "--client-id", "a", "--secret-file", str(tmp_path / "a.secret"), "--model", str(tiny_model_dir),
             "--data", str(data_dir / "client_00.parquet"), "--state-dir", str(state_dir), "--steps", "3",
             "--quantization", "none", "--quiet", "--timeout", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert _wait_until(lambda: (state_dir / "pending_update.json").exists() or device.poll() is not None, 120)
        time.sleep(0.5)  # published by now; no hub to answer
        device.send_signal(signal.SIGKILL)
        device.wait(10)
        trained, _ = tensor_codec.decode((state_dir / "pending_adapter.safetensors").read_bytes())
        saved = (state_dir / "pending_signed_part.bin").read_bytes()  # the envelope without its MAC
        saved_message_id = json.loads((state_dir / "pending_update.json").read_text())["message_id"]
        assert load_state(state_dir) is None  # nothing committed yet: a restart starts from the shared init
        from fedvlm.edge.personal_model import PersonalVLM

        initial = PersonalVLM.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=8), strategy="plora",
                                              quantization="none").personal_factors()  # fmt: skip
        trained_a = {k: v for k, v in trained.items() if factor_of(k) == "A"}
        assert trained_a.keys() == initial.keys()
        assert any(not np.array_equal(initial[k], v) for k, v in trained_a.items())

        # The hub comes back (resuming round 1), and so does the device, with b joining now.
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=2)
        devices = [_client(tmp_path, tiny_model_dir, "fed", name, secrets[name], mosquitto.broker,
                           tiny_federation.clients[i]) for i, name in enumerate(("a", "b"))]  # fmt: skip
        threads, errors = _run_in_threads(devices, rounds=1)
        for thread in threads:
            thread.join(timeout=180)
        assert not errors, errors
        hub.stop()
        reports = devices[0].reports
        assert [r.accepted for r in reports] == [True]
        # The saved update, sealed again under its message id, not a retrained one.
        with HubStore.in_state_dir(tmp_path / "hub", create=False) as store:
            (receipt,) = [r for r in store.receipts(1) if r.client_id == "a"]
        assert receipt.message_id == saved_message_id
        assert receipt.payload_sha256 == hashlib.sha256(seal_envelope(saved, secrets["a"])).hexdigest()
        after = load_state(state_dir)
        assert after.round == 1
        assert all(np.array_equal(after.personal[k], v) for k, v in trained_a.items())
        assert not (state_dir / "pending_update.json").exists()
    finally:
        if device is not None and device.poll() is None:
            device.kill()
        mosquitto.stop()


def test_a_stale_pending_update_still_leaves_its_trained_personal_factors(tmp_path, tiny_model_dir, tiny_federation):
    """Back after the hub moved on (the update may have been accepted): the update is not
    re-sent, but the personal factors it was trained with are kept, not the older ones."""
    from fedvlm.edge.personal_model import PersonalVLM

    client = EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, "mqtt://127.0.0.1:1", "fed", "a", "s" * 32,
                        tmp_path / "device", training=QUICK, quantization="none")  # never connected
    client.model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=8), strategy="plora",
                                               quantization="none")  # fmt: skip
    before = client.model.personal_factors()
    client.model.train(tiny_federation.clients[0].train, QUICK)
    trained = client.model.personal_factors()
    assert any(not np.array_equal(before[k], trained[k]) for k in before)
    client._save_pending(3, b"envelope", b"\x01" * 16, 1024, {}, None)
    client.model.load_personal(before)  # as after a restart from the last committed state

    assert client._pending_update(4) is None  # the hub is at round 4 now: nothing to re-send
    assert all(np.array_equal(client.model.personal_factors()[k], v) for k, v in trained.items())
    assert not (tmp_path / "device" / "pending_update.json").exists()


@pytest.mark.parametrize(("hub_speaks", "upgrade"), [(1, "upgrade the hub"), (99, "upgrade the device")])
def test_a_device_stops_with_a_clear_error_when_the_hub_speaks_another_protocol(tmp_path, tiny_model_dir,
                                                                                  tiny_federation, hub_speaks, upgrade):
    from fedvlm.shared.protocol import HubState, Presence, RoundPhase

    client = EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, "mqtt://127.0.0.1:1", "fed", "a", "s" * 32,
                        tmp_path / "device", training=QUICK, quantization="none")  # never connected
    state = HubState(federation="fed", status=Presence.ONLINE, round=1, phase=RoundPhase.WAITING, global_version=0,
                     protocol_version=hub_speaks)  # fmt: skip
    with pytest.raises(EdgeClientError, match=upgrade):
        client._handle("hub_state", state.to_json())
    assert client.hub_state is None and client.model is None  # nothing built on a hub it cannot talk to
    # An offline hub's last will (a hub being upgraded): the device waits for its successor.
    offline = dataclasses.replace(state, status=Presence.OFFLINE)
    assert client._handle("hub_state", offline.to_json()) is None
    assert client.hub_state is None


def test_an_update_saved_in_an_older_protocol_version_is_dropped_and_the_round_trained_again(
        tmp_path, tiny_model_dir, tiny_federation):  # fmt: skip
    """After an upgrade, a pending update saved by the older SDK would be refused by the hub
    (unsupported_version): it is dropped, not re-sent, and the round is trained again."""
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.protocol import MAC_SIZE, EnvelopeMetadata, sign

    client = EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, "mqtt://127.0.0.1:1", "fed", "a", "s" * 32,
                        tmp_path / "device", training=QUICK, quantization="none")  # never connected
    client.model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=8), strategy="plora",
                                               quantization="none")  # fmt: skip
    metadata = EnvelopeMetadata(federation="fed", round=2, client_id="a", sample_count=4, strategy="plora",
                                base_fingerprint="f", lora_config_hash="h")  # fmt: skip
    current = sign(b"body", metadata, "a", "s" * 32)
    older = current[:4] + (1).to_bytes(2, "big") + current[6:]  # as protocol 1 wrote the version
    client._save_pending(2, current[:-MAC_SIZE], b"\x01" * 16, 1024, {}, None)  # today's: the signed part
    assert client._pending_update(2)[:3] == (current, b"\x01" * 16, 1024)  # sealed again, byte for byte
    client._save_pending(2, older[:-MAC_SIZE], b"\x01" * 16, 1024, {}, None)
    assert client._pending_update(2) is None
    assert not (tmp_path / "device" / "pending_update.json").exists()


def test_a_publish_failing_midway_keeps_the_update_to_resend_instead_of_training_again(
        tmp_path, tiny_model_dir, tiny_federation, monkeypatch):  # fmt: skip
    """Chunks are signed as they are published and the update is saved before its last chunk;
    when the broker goes away midway, the rest is signed and the update saved anyway, so the
    device re-sends it later rather than training a second time in the same round."""
    import time

    from fedvlm.edge.edge_client import ConnectionOptions
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.mqtt_link import BrokerUnavailable, MqttLink
    from fedvlm.shared.protocol import MIN_CHUNK_SIZE, HubState, Presence, RoundPhase, open_envelope

    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    secret = "a-secret-of-enough-length-0123456789"
    client = EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, mosquitto.broker.url, "fed", "a", secret,
                        tmp_path / "device", training=QUICK, quantization="none",
                        connection=ConnectionOptions(chunk_size=MIN_CHUNK_SIZE))  # fmt: skip
    try:
        client.connect()
        # Rank 64 makes the shared update ~100 KB: ~100 chunks of 1 KiB.
        client.model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LoraSettings(r=64, alpha=128),
                                                   strategy="plora", quantization="none")  # fmt: skip
        chunks = -(-sum(t.nbytes for t in client.model.shared_update().values()) // MIN_CHUNK_SIZE)
        assert chunks > 2 * 32, "the update must outlast publish_many's window for this test to mean anything"
        mosquitto.stop()  # gone before the first chunk is acknowledged
        publish_many = MqttLink.publish_many
        monkeypatch.setattr(MqttLink, "publish_many",
                            lambda self, messages, **options: publish_many(self, messages, **{**options, "timeout": 2}))
        hub = HubState(federation="fed", status=Presence.ONLINE, round=1, phase=RoundPhase.COLLECTING,
                       global_version=0, selected_count=1, deadline=time.time() + 60)  # fmt: skip
        with pytest.raises(BrokerUnavailable):
            client._take_part(hub)
        pending = client._pending_update(1)
        assert pending is not None, "the update was not kept"
        opened = open_envelope(pending[0], {"a": secret}.get, expected_client_id="a")
        assert opened.metadata.round == 1 and opened.metadata.client_id == "a"
    finally:
        client.close()
        mosquitto.stop()


def test_a_state_dir_that_is_a_file_is_refused_before_any_training(tmp_path, tiny_model_dir, tiny_federation):
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("oops")
    with pytest.raises(EdgeClientError, match="is a file"):
        EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, "mqtt://127.0.0.1:1", "fed", "a", "s" * 32,
                   not_a_dir, training=QUICK, quantization="none")  # fmt: skip


def test_plora_refit_steps_refit_a_on_the_device_once_the_global_b_arrives(tmp_path, tiny_model_dir, tiny_federation):
    """--strategy-option refit_steps=1: of 3 local steps, 2 train both factors and 1 refits A to the global B."""
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        secrets = {name: register_client(tmp_path / "hub", name) for name in ("a", "b")}
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=2, local_steps=3,
                   strategy_options={"refit_steps": 1})
        clients = [_client(tmp_path, tiny_model_dir, "fed", n, secrets[n], mosquitto.broker, tiny_federation.clients[i])
                   for i, n in enumerate(("a", "b"))]
        _run_to_the_end(clients, hub)
        for client in clients:
            state = load_state(tmp_path / "devices" / client.client_id)
            assert client.model.strategy.refit_steps == 1  # built from the hub's announced options
            (entry,) = state.metrics
            assert entry["train"]["steps"] == 2 and entry["refit"]["steps"] == 1
            # B is the global one as received; the refit changed only A, after B arrived.
            assert all(np.array_equal(state.current_shared[k], state.global_state[k]) for k in state.global_state)
            assert all(factor_of(k) == "A" for k in state.personal)
    finally:
        mosquitto.stop()


def test_an_unanswered_update_is_sent_again_as_soon_as_the_hub_is_back_online(tmp_path, tiny_model_dir,
                                                                              tiny_federation):  # fmt: skip
    """After a hub restart the device does not wait for its re-send timer: the hub's state
    going offline and online again triggers the re-send (what a restarted hub had not
    committed it may not get from the broker again)."""
    import time

    from fedvlm.shared.protocol import Ack, HubState, Presence, RoundPhase

    client = EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, "mqtt://127.0.0.1:1", "fed", "a", "s" * 43,
                        tmp_path / "device", training=QUICK, quantization="none")  # fmt: skip
    hub = HubState(federation="fed", status=Presence.ONLINE, round=1, phase=RoundPhase.COLLECTING, global_version=0,
                   selected_count=1, deadline=time.time() + 60)  # fmt: skip
    message_id = bytes(range(16))
    resent: list[float] = []

    def resend() -> None:  # the hub, back, answers the re-sent update
        resent.append(time.monotonic())
        client._events.put(("ack", Ack.accept("a", 1, message_id).to_json()))

    client._events.put(("hub_state", dataclasses.replace(hub, status=Presence.OFFLINE).to_json()))
    client._events.put(("hub_state", hub.to_json()))
    started = time.monotonic()
    ack = client._wait_for_ack(message_id, hub, resend=resend)
    assert ack.accepted and len(resent) == 1 and resent[0] - started < 2.0  # not the 15 s timer
    client._events.put(("manifest", b"arrived after the ack"))
    # What the wait read past is handled after the round, and before anything newer.
    assert [kind for kind, _ in client._events.pending()] == ["hub_state", "hub_state", "manifest"]


def test_a_device_never_goes_back_to_an_older_global_manifest(tmp_path, tiny_model_dir, tiny_federation):
    """An old retained manifest re-delivered after a reconnect must not replace a newer one:
    the device would wait for chunks the hub has already cleared (the broker-restart stall)."""
    import time

    from fedvlm.shared.protocol import GlobalManifest

    client = EdgeClient(tiny_model_dir, tiny_federation.clients[0].train, "mqtt://127.0.0.1:1", "fed", "a", "s" * 43,
                        tmp_path / "device", training=QUICK, quantization="none")  # fmt: skip

    def manifest(version: int) -> bytes:
        return GlobalManifest(federation="fed", version=version, round=version, strategy="plora",
                              payload_sha256="0" * 64, total_size=1, chunk_count=1, chunk_size=65536,
                              base_fingerprint="base", lora_config_hash="lora", created_at=time.time()).to_json()  # fmt: skip

    client._handle("manifest", manifest(2))
    client._handle("manifest", manifest(1))
    assert client.manifest.version == 2
    client._handle("manifest", manifest(3))
    assert client.manifest.version == 3


def _without_rejected(examples):
    return [example.replace(rejected=None) for example in examples]


def test_a_device_without_preference_pairs_stops_with_the_reason_when_its_hub_announces_dpo(
        tmp_path, tiny_model_dir, tiny_federation):
    """The device was started without --objective, so its data was read as SFT data; only the
    hub's announcement says DPO. It stops before training, naming the federation's objective."""
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        secret = register_client(tmp_path / "hub", "a")
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=1, objective="dpo")
        data = dataclasses.replace(tiny_federation.clients[0], train=_without_rejected(tiny_federation.clients[0].train))
        device = _client(tmp_path, tiny_model_dir, "fed", "a", secret, mosquitto.broker, data)
        with pytest.raises(EdgeClientError, match=r"trains with DPO \(announced by its hub\).* 32 of 32 .*preference pairs"):
            device.run(timeout=120)
        assert hub.store.receipt(1, "a") is None
        hub.stop()
    finally:
        mosquitto.stop()


def test_skip_bad_trains_a_dpo_federation_on_the_preference_pairs_only(tmp_path, tiny_model_dir, tiny_federation):
    mosquitto = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        secret = register_client(tmp_path / "hub", "a")
        hub = _hub(tmp_path, mosquitto.broker, rounds=1, min_clients=1, objective="dpo")
        train = tiny_federation.clients[0].train
        data = dataclasses.replace(tiny_federation.clients[0], train=_without_rejected(train[:12]) + list(train[12:]))
        device = EdgeClient(tiny_model_dir, data.train, mosquitto.broker.url, "fed", "a", secret,
                            tmp_path / "devices" / "a", training=QUICK, quantization="none", skip_unpaired=True)
        reports = device.run(timeout=120)
        assert [report.accepted for report in reports] == [True]
        assert reports[0].train["objective"] == "dpo"
        assert len(device.train_examples) == len(train) - 12
        assert hub.wait_finished(timeout=30)
        assert hub.store.receipt(1, "a").sample_count == len(train) - 12
        hub.stop()
    finally:
        mosquitto.stop()
