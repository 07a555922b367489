"""``fedvlm-hub broker-config`` against a real mosquitto with TLS: who gets in, who reads and writes what."""

from __future__ import annotations

import base64
import hashlib
import io
import stat
import threading
import time
from pathlib import Path

import pytest

from fedvlm.hub.broker_config import publisher_password
from fedvlm.hub.cli import main as hub_main
from fedvlm.hub.config import HubConfig
from fedvlm.hub.console import Console
from fedvlm.hub.service import HubService
from fedvlm.hub.store import HubStore
from fedvlm.shared.broker_credentials import broker_password
from fedvlm.shared.mqtt_link import BrokerUnavailable, MqttLink
from fedvlm.shared.protocol import Announcement, HubState, Presence, Topics, new_message_id
from tests.brokers import free_port
from tests.hub.fake_clients import FakeClient, b_factors
from tests.security.locked_broker import LockedMosquitto, Login, make_pki

FEDERATION = "fed"
HUB_USER = "fedvlm-hub"


class Lockdown:
    """A hub state with registered clients, the files broker-config wrote, and mosquitto running them."""

    def __init__(self, root: Path, *, workers: int = 0) -> None:
        self.root = root
        self.workers = workers
        self.state = root / "hub"
        self.out = root / "broker"
        self.pki = make_pki(root / "pki")
        self.port = free_port()
        self.secrets = {name: self._add(name) for name in ("alice", "bob", "carol", "dave")}
        hub_main(["clients", "revoke", "carol", "--state-dir", str(self.state)])  # revoked before: no account
        self.write_config()
        self.hub_password = (self.out / "hub.password").read_text().strip()
        self.mosquitto = LockedMosquitto(self.out / "mosquitto.conf", self.port).start()

    def _add(self, name: str) -> str:
        from fedvlm.hub.clients import register_client

        return register_client(self.state, name)

    def write_config(self) -> None:
        assert hub_main(["broker-config", "--state-dir", str(self.state), "--out", str(self.out), "--federation",
                         FEDERATION, "--port", str(self.port), "--bind", "127.0.0.1",
                         "--tls-cafile", str(self.pki.ca_cert), "--tls-certfile", str(self.pki.server_cert),
                         "--tls-keyfile", str(self.pki.server_key), "--workers", str(self.workers)]) == 0  # fmt: skip

    def login(self, name: str, password: str | None = None) -> Login:
        password = password if password is not None else broker_password(self.secrets[name])
        return Login(self.mosquitto.address(name, password, ca_file=self.pki.ca_cert))

    def connect(self, username: str | None, password: str | None, *, protocol: str = "5",
                ca_file: Path | None = None, tls: bool = True) -> MqttLink:  # fmt: skip
        address = self.mosquitto.address(username, password, ca_file=(ca_file or self.pki.ca_cert) if tls else None,
                                         tls=tls)  # fmt: skip
        return MqttLink(address, f"probe-{new_message_id().hex()[:6]}", protocol=protocol,
                        persistent_session=False, reconnect_max_s=1).connect(5)  # fmt: skip


@pytest.fixture(scope="module")
def lockdown(tmp_path_factory):
    setup = Lockdown(tmp_path_factory.mktemp("lockdown"), workers=1)
    yield setup
    setup.mosquitto.stop()


def _verify_mosquitto_hash(line_hash: str, password: str) -> bool:
    _, kind, iterations, salt, digest = line_hash.split("$")
    assert kind == "7"
    computed = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations), 64)
    return base64.b64encode(computed).decode() == digest


def test_the_written_files_hold_hashes_and_patterns_not_secrets(lockdown: Lockdown):
    out = lockdown.out
    for name in ("passwords", "acl", "mosquitto.conf", "hub.password", "README.txt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    accounts = dict(line.split(":", 1) for line in (out / "passwords").read_text().splitlines())
    assert set(accounts) == {HUB_USER, f"{HUB_USER}-publisher", f"{HUB_USER}-worker-0", "alice", "bob",
                             "dave"}  # carol is revoked: no account  # fmt: skip
    assert _verify_mosquitto_hash(accounts[HUB_USER], lockdown.hub_password)
    assert _verify_mosquitto_hash(accounts[f"{HUB_USER}-publisher"], publisher_password(lockdown.hub_password))
    worker_password = (out / "worker-0.password").read_text().strip()
    assert stat.S_IMODE((out / "worker-0.password").stat().st_mode) == 0o600
    assert _verify_mosquitto_hash(accounts[f"{HUB_USER}-worker-0"], worker_password)
    for name in ("alice", "bob", "dave"):
        assert _verify_mosquitto_hash(accounts[name], broker_password(lockdown.secrets[name]))
        assert not _verify_mosquitto_hash(accounts[name], lockdown.secrets[name])  # the secret is not the password
    everything = "".join((out / name).read_text() for name in ("passwords", "acl", "mosquitto.conf", "README.txt"))
    for secret in lockdown.secrets.values():
        assert secret not in everything and broker_password(secret) not in everything
    assert lockdown.hub_password not in everything and worker_password not in everything
    conf = (out / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", f"password_file {out / 'passwords'}", f"acl_file {out / 'acl'}",
                 "use_username_as_clientid true", f"listener {lockdown.port} 127.0.0.1",
                 f"certfile {lockdown.pki.server_cert}", "tls_version tlsv1.2"):  # fmt: skip
        assert line in conf.splitlines(), line
    acl = (out / "acl").read_text().splitlines()
    assert "pattern write fedvlm/v1/fed/updates/%u/+" in acl and "pattern read fedvlm/v1/fed/clients/%u/ack" in acl
    assert not any(line.startswith("pattern") and "updates" in line and "read" in line for line in acl)
    # The hub's publisher account writes what the hub publishes, and reads nothing.
    publisher = acl[acl.index(f"user {HUB_USER}-publisher") + 1:]
    publisher = publisher[:publisher.index("")]
    assert "topic write fedvlm/v1/fed/clients/+/ack" in publisher and "topic write fedvlm/v1/fed/hub/state" in publisher
    assert all(line.startswith("topic write ") and "updates" not in line for line in publisher
               if not line.startswith("topic deny "))  # fmt: skip
    # Nor may it act as a device of its own name (the device patterns apply to every account).
    assert f"topic deny fedvlm/v1/fed/updates/{HUB_USER}-publisher/+" in publisher
    assert f"topic deny fedvlm/v1/fed/clients/{HUB_USER}-publisher/announce" in publisher
    # Re-running (after a clients add) keeps the hub's broker password, so a running setup stays valid.
    lockdown.write_config()
    assert (out / "hub.password").read_text().strip() == lockdown.hub_password
    assert (out / "worker-0.password").read_text().strip() == worker_password


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_only_registered_accounts_with_the_right_password_get_in(lockdown: Lockdown, protocol: str):
    alice_password = broker_password(lockdown.secrets["alice"])
    refused = {
        "anonymous": (None, None),
        "wrong password": ("alice", "not-the-password"),
        "the HMAC secret instead of the broker password": ("alice", lockdown.secrets["alice"]),
        "another client's password": ("alice", broker_password(lockdown.secrets["bob"])),
        "a revoked client": ("carol", broker_password(lockdown.secrets["carol"])),
        "an unregistered name": ("mallory", alice_password),
    }
    for case, (username, password) in refused.items():
        with pytest.raises(BrokerUnavailable, match="Not authorized"):
            lockdown.connect(username, password, protocol=protocol)
            pytest.fail(f"{case}: connected")
    lockdown.connect("alice", alice_password, protocol=protocol).close()
    lockdown.connect(HUB_USER, lockdown.hub_password, protocol=protocol).close()


def test_tls_is_required_and_the_broker_is_verified(lockdown: Lockdown):
    alice_password = broker_password(lockdown.secrets["alice"])
    with pytest.raises(BrokerUnavailable):  # plain MQTT to the TLS listener
        lockdown.connect("alice", alice_password, tls=False)
    with pytest.raises(BrokerUnavailable, match="certificate verify failed"):  # a CA that did not sign the broker
        lockdown.connect("alice", alice_password, ca_file=lockdown.pki.other_ca_cert)
    lockdown.connect("alice", alice_password).close()


def test_revoking_at_the_broker_after_rewriting_the_config_and_a_reload(lockdown: Lockdown):
    dave_password = broker_password(lockdown.secrets["dave"])
    lockdown.connect("dave", dave_password).close()
    assert hub_main(["clients", "revoke", "dave", "--state-dir", str(lockdown.state)]) == 0
    lockdown.write_config()
    lockdown.mosquitto.reload()
    deadline = time.monotonic() + 5
    while True:  # SIGHUP is handled asynchronously
        try:
            lockdown.connect("dave", dave_password).close()
        except BrokerUnavailable as error:
            assert "Not authorized" in str(error)
            break
        assert time.monotonic() < deadline, "dave still gets in after the reload"
        time.sleep(0.1)
    lockdown.connect("alice", broker_password(lockdown.secrets["alice"])).close()


def test_a_client_can_neither_read_nor_impersonate_another(lockdown: Lockdown, tmp_path: Path):
    config = HubConfig(federation=FEDERATION, state_dir=lockdown.state, broker=f"mqtts://127.0.0.1:{lockdown.port}",
                       username=HUB_USER, password=lockdown.hub_password, ca_file=str(lockdown.pki.ca_cert),
                       mqtt_protocol="5", min_clients=2, round_timeout_s=30.0, rounds=1, done_linger_s=0.0)
    hub = HubService(config, console=Console(enabled=False)).start()
    topics = Topics(FEDERATION)
    alice = FakeClient(lockdown.login("alice"), FEDERATION, "alice", lockdown.secrets["alice"])
    bob = FakeClient(lockdown.login("bob"), FEDERATION, "bob", lockdown.secrets["bob"])
    seen_by_alice: list[str] = []
    lock = threading.Lock()

    def eavesdrop(topic: str, payload: bytes, retained: bool) -> None:
        with lock:
            seen_by_alice.append(topic)

    try:
        alice.connect()
        bob.connect()
        # alice tries to listen to everything about bob (and everything at all).
        for topic_filter in ("fedvlm/v1/fed/updates/#", "fedvlm/v1/fed/updates/bob/+", topics.client_ack("bob"),
                             topics.client_announce("bob"), "fedvlm/v1/fed/clients/+/announce", "fedvlm/v1/#", "#"):
            alice.link.subscribe(topic_filter, eavesdrop)
        alice.wait_collecting(1, timeout=20)

        # alice publishes as bob: an update on bob's topic, and bob's presence as offline.
        forged = alice.envelope(b_factors(9), 1)
        alice.publish(forged, topic_client="bob")
        alice.link.publish(topics.client_announce("bob"),
                           Announcement("bob", Presence.OFFLINE, "0.1.0").to_json(), retain=True)  # fmt: skip
        # Then both send their own updates (published after the forgeries on alice's connection,
        # so the hub would have judged the forgeries first had the broker let them through).
        assert alice.wait_ack(alice.send(b_factors(1), 1)).accepted
        bob_message = bob.send(b_factors(2), 1)
        assert bob.wait_ack(bob_message).accepted
        assert hub.wait_finished(20)
        # The hub's acks, selections and state went out on its second connection, its own account.
        assert hub._out is not None and hub._out is not hub._link
        assert hub._out.address.username == f"{HUB_USER}-publisher"
        time.sleep(0.5)  # room for any stray delivery

        with HubStore.in_state_dir(lockdown.state, create=False) as store:
            # The hub never saw the forged update (it would have been refused and counted as
            # client_mismatch) nor the forged announcement (bob stays online).
            assert store.rejection_counts() == {}
            receipts = {r.client_id: r for r in store.receipts(1)}
            assert set(receipts) == {"alice", "bob"} and receipts["bob"].message_id == bob_message.hex()
            assert {c.client_id: c.presence for c in store.list_clients()}["bob"] == "online"
        with lock:
            received = list(seen_by_alice)
        assert any(topic == topics.hub_state() for topic in received)  # alice's subscriptions do work
        leaked = [topic for topic in received
                  if "/bob/" in topic or "/updates/" in topic or topic.endswith("/announce")]
        assert leaked == [], f"alice received another client's messages: {leaked}"
        assert bob.acks.empty()  # bob got exactly his one ack, which wait_ack consumed
    finally:
        alice.close(announce_offline=False)
        bob.close(announce_offline=False)
        hub.stop()


def test_a_broker_without_the_publisher_account_gets_every_publish_on_the_one_connection(lockdown: Lockdown):
    """A broker set up by an older broker-config has no account for the hub's publisher: the hub
    says so, and publishes on its one connection as before."""
    passwords = lockdown.out / "passwords"
    original = passwords.read_text()
    passwords.write_text("".join(line for line in original.splitlines(keepends=True)
                                 if not line.startswith(f"{HUB_USER}-publisher:")))  # fmt: skip
    lockdown.mosquitto.reload()
    publisher = publisher_password(lockdown.hub_password)
    stream = io.StringIO()
    hub = None
    try:
        deadline = time.monotonic() + 5
        while True:  # SIGHUP is handled asynchronously
            try:
                lockdown.connect(f"{HUB_USER}-publisher", publisher).close()
            except BrokerUnavailable:
                break
            assert time.monotonic() < deadline, "the publisher account still gets in after the reload"
            time.sleep(0.1)
        config = HubConfig(federation=FEDERATION, state_dir=lockdown.state, broker=f"mqtts://127.0.0.1:{lockdown.port}",
                           username=HUB_USER, password=lockdown.hub_password, ca_file=str(lockdown.pki.ca_cert),
                           mqtt_protocol="5", min_clients=2, rounds=1)  # fmt: skip
        hub = HubService(config, console=Console(stream)).start()
        assert hub._out is hub._link
        assert "broker-config" in stream.getvalue() and f"{HUB_USER}-publisher" in stream.getvalue()
        assert hub._out.flush(5)  # its state went out on the one connection
    finally:
        if hub is not None:
            hub.stop()
        passwords.write_text(original)
        lockdown.mosquitto.reload()


def test_when_the_publisher_connection_drops_its_will_says_offline_and_the_hub_says_online_again(lockdown: Lockdown):
    """The hub's state goes out on its second connection, so that connection carries the last
    will too; once it is back the hub publishes its state again (not only when the first
    connection reconnects). The drop: another login on the publisher account, which
    use_username_as_clientid makes the same MQTT client, knocks the hub's off."""
    config = HubConfig(federation=FEDERATION, state_dir=lockdown.state, broker=f"mqtts://127.0.0.1:{lockdown.port}",
                       username=HUB_USER, password=lockdown.hub_password, ca_file=str(lockdown.pki.ca_cert),
                       mqtt_protocol="5", min_clients=2, rounds=1)  # fmt: skip
    hub = HubService(config, console=Console(io.StringIO())).start()
    reader = None
    try:
        assert hub._out is not hub._link
        statuses: list[Presence] = []
        reader = lockdown.connect("alice", broker_password(lockdown.secrets["alice"]))
        reader.subscribe(Topics(FEDERATION).hub_state(),
                         lambda topic, payload, retained: statuses.append(HubState.from_json(payload).status))
        _wait_for(lambda: statuses and statuses[-1] is Presence.ONLINE, "the hub's state online")
        intruder = lockdown.connect(f"{HUB_USER}-publisher", publisher_password(lockdown.hub_password))
        intruder.close()
        _wait_for(lambda: Presence.OFFLINE in statuses, "the publisher connection's will")
        _wait_for(lambda: statuses[-1] is Presence.ONLINE, "the state published again once it is back")
    finally:
        if reader is not None:
            reader.close()
        hub.stop()


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.05)


def test_hub_workers_on_their_own_accounts_share_a_round_and_may_do_no_more(tmp_path: Path):
    """broker-config's use_username_as_clientid makes the username the client id: workers on
    the hub's account would knock the coordinator (and each other) off. With the accounts
    broker-config writes for them, a coordinator and 2 workers take a round of multi-chunk
    updates (relayed between the workers) through the locked-down mosquitto; a worker's
    account can neither read announcements nor write the hub's state."""
    import dataclasses

    from fedvlm.hub.worker import HubWorker

    setup = Lockdown(tmp_path, workers=2)
    config = HubConfig(federation=FEDERATION, state_dir=setup.state, broker=f"mqtts://127.0.0.1:{setup.port}",
                       username=HUB_USER, password=setup.hub_password, ca_file=str(setup.pki.ca_cert),
                       mqtt_protocol="5", min_clients=2, round_timeout_s=30.0, rounds=1, done_linger_s=0.0,
                       workers=2)  # fmt: skip
    hub = HubService(config, console=Console(enabled=False)).start()
    workers, clients = [], []
    probe = None
    try:
        for index in range(2):
            login = dataclasses.replace(config, username=f"{HUB_USER}-worker-{index}",
                                        password=(setup.out / f"worker-{index}.password").read_text().strip())
            workers.append(HubWorker(login, index=index, workers=2, console=Console(enabled=False)).start())
        clients = [FakeClient(setup.login(name), FEDERATION, name, setup.secrets[name]).connect()
                   for name in ("alice", "bob")]  # fmt: skip
        clients[0].wait_collecting(1, timeout=20)
        sent = {client.client_id: client.send(b_factors(seed, rank=4, out_features=300), 1)
                for seed, client in enumerate(clients)}  # several chunks each: relayed to their owner
        for client in clients:
            assert client.wait_ack(sent[client.client_id], timeout=20).accepted
        assert hub.wait_finished(20)
        assert hub._link is not None and hub._link.connected.is_set()  # never knocked off

        # After the round: on a worker's account the probe takes that worker's client id.
        topics = Topics(FEDERATION)
        probe = setup.connect(f"{HUB_USER}-worker-0", (setup.out / "worker-0.password").read_text().strip())
        probe.publish_nowait(topics.hub_state(), b"forged", retain=True)
        seen: list[str] = []
        probe.subscribe(topics.client_announcements_filter(), lambda topic, *rest: seen.append(topic))
        states: list[bytes] = []
        reader = setup.connect(HUB_USER, setup.hub_password)
        as_device: list[str] = []
        reader.subscribe(topics.client_announcements_filter(), lambda topic, *rest: as_device.append(topic))
        reader.subscribe("fedvlm/v1/fed/updates/#", lambda topic, *rest: as_device.append(topic))
        time.sleep(0.3)
        as_device.clear()  # the devices' retained announcements
        # Nor may a worker act as a device of its own name (the device patterns apply to it too).
        probe.publish_nowait(topics.client_announce(f"{HUB_USER}-worker-0"), b"{}", retain=True)
        probe.publish_nowait(f"fedvlm/v1/fed/updates/{HUB_USER}-worker-0/00", b"forged")
        time.sleep(0.5)  # the forged state would be retained by now, and the retained announcements delivered
        assert as_device == [], "a worker's account published as a device of its own name"
        reader.subscribe(topics.hub_state(), lambda topic, payload, retained: states.append(payload))
        deadline = time.monotonic() + 5
        while not states and time.monotonic() < deadline:
            time.sleep(0.05)
        reader.close()
        assert seen == [], "a worker's account read the devices' announcements"
        assert states and states[-1] != b"forged", "a worker's account wrote the hub's state"
    finally:
        if probe is not None:
            probe.close()
        for client in clients:
            client.close(announce_offline=False)
        for worker in workers:
            worker.stop()
        hub.stop()
        setup.mosquitto.stop()
