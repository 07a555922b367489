"""Client secrets at rest: encrypted in SQLite, migrated from plain text, revocable while the hub runs."""

from __future__ import annotations

import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from fedvlm.hub.cli import main as hub_main
from fedvlm.hub.secrets_at_rest import DEFAULT_KEY_FILE_NAME, SECRETS_KEY_ENVIRONMENT, SecretsKeyError
from fedvlm.hub.store import DATABASE_NAME, HubStore
from fedvlm.shared.protocol import ReasonCode, new_client_secret
from tests.hub.fake_clients import b_factors


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch):
    monkeypatch.delenv(SECRETS_KEY_ENVIRONMENT, raising=False)


def _add(capsys, state_dir: Path, name: str, *extra: str) -> str:
    assert hub_main(["clients", "add", name, "--state-dir", str(state_dir), *extra]) == 0
    return capsys.readouterr().out.rstrip("\n").splitlines()[-1]


def _database_bytes(state_dir: Path) -> bytes:
    """Everything SQLite keeps on disk for the database: the file, its WAL and shared memory."""
    return b"".join(path.read_bytes() for path in state_dir.glob(f"{DATABASE_NAME}*"))


def test_secrets_are_stored_encrypted_and_read_back(tmp_path: Path, capsys):
    state = tmp_path / "hub"
    secrets = {name: _add(capsys, state, name) for name in ("phone-1", "phone-2")}
    on_disk = _database_bytes(state)
    for secret in secrets.values():
        assert secret.encode() not in on_disk
    key_file = state / DEFAULT_KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with HubStore.in_state_dir(state) as store:
        stored = dict(store._conn.execute("SELECT client_id, secret FROM clients"))
        assert all(value.startswith("aesgcm1:") for value in stored.values())
        assert stored["phone-1"] != stored["phone-2"]
        assert {name: store.secret_of(name) for name in secrets} == secrets


def test_a_database_copied_without_its_key_reveals_no_secret(tmp_path: Path, capsys):
    state = tmp_path / "hub"
    secret = _add(capsys, state, "phone-1")
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    for path in state.glob(f"{DATABASE_NAME}*"):
        shutil.copy(path, stolen / path.name)
    assert secret.encode() not in _database_bytes(stolen)
    with HubStore.in_state_dir(stolen, create=False) as store:
        with pytest.raises(SecretsKeyError, match="missing"):
            store.secret_of("phone-1")
    # Nor does another key open it: the key id in the database says which one it needs.
    with HubStore.in_state_dir(stolen, create=False, secrets_key_file=tmp_path / "other.key") as store:
        with pytest.raises(SecretsKeyError, match="missing"):  # no key is ever made up for existing secrets
            store.secret_of("phone-1")
    assert not (tmp_path / "other.key").exists()


def test_the_wrong_key_is_refused_when_the_hub_opens_its_state(tmp_path: Path, capsys):
    state = tmp_path / "hub"
    _add(capsys, state, "phone-1")
    other = tmp_path / "other.key"
    _add(capsys, tmp_path / "elsewhere", "x", "--secrets-key-file", str(other))  # a valid key of another hub
    with pytest.raises(SecretsKeyError, match="encrypted with key id"):
        HubStore.in_state_dir(state, secrets_key_file=other)
    # On the command line: one line saying what to do, no traceback.
    assert hub_main(["clients", "add", "phone-2", "--state-dir", str(state), "--secrets-key-file", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--secrets-key-file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_key_file_other_users_can_read_is_refused(tmp_path: Path, capsys):
    state = tmp_path / "hub"
    _add(capsys, state, "phone-1")
    (state / DEFAULT_KEY_FILE_NAME).chmod(0o644)
    with HubStore.in_state_dir(state, create=False) as store:
        with pytest.raises(SecretsKeyError, match="chmod 600"):
            store.secret_of("phone-1")


def test_the_key_can_live_outside_the_state_dir(tmp_path: Path, capsys, monkeypatch):
    key_file = tmp_path / "keys" / "fedvlm.key"
    monkeypatch.setenv(SECRETS_KEY_ENVIRONMENT, str(key_file))
    state = tmp_path / "hub"
    secret = _add(capsys, state, "phone-1")
    assert key_file.exists() and not (state / DEFAULT_KEY_FILE_NAME).exists()
    with HubStore.in_state_dir(state, create=False) as store:
        assert store.secret_of("phone-1") == secret


def test_plain_text_secrets_of_an_older_hub_are_encrypted_on_open(tmp_path: Path):
    state = tmp_path / "hub"
    with HubStore.in_state_dir(state) as store:
        store.add_client("placeholder", new_client_secret(), now=1.0)  # makes the tables
    # What an older hub left: plain-text secrets and no key id.
    legacy = {"old-1": new_client_secret(), "old-2": new_client_secret()}
    key_file = state / DEFAULT_KEY_FILE_NAME
    key_file.unlink()
    with sqlite3.connect(state / DATABASE_NAME) as raw:
        raw.execute("DELETE FROM clients")
        raw.execute("DELETE FROM meta WHERE key = 'secrets_key_id'")
        raw.executemany("INSERT INTO clients (client_id, secret, created_at) VALUES (?, ?, 1.0)", legacy.items())
    raw.close()
    assert all(secret.encode() in _database_bytes(state) for secret in legacy.values())

    # A read-only opener (status) reads it as it is and changes nothing.
    with HubStore.in_state_dir(state, create=False) as store:
        assert store.secret_of("old-1") == legacy["old-1"]
    assert not key_file.exists()

    with HubStore.in_state_dir(state) as store:  # the hub or `clients add` opening it
        stored = dict(store._conn.execute("SELECT client_id, secret FROM clients"))
        assert all(value.startswith("aesgcm1:") for value in stored.values())
        assert {name: store.secret_of(name) for name in legacy} == legacy
    assert key_file.exists()
    on_disk = _database_bytes(state)
    for secret in legacy.values():  # gone from the file and its write-ahead log, not just hidden
        assert secret.encode() not in on_disk


def test_revoke_applies_to_the_next_update_while_the_hub_runs(start_federation, capsys):
    federation = start_federation("embedded", clients=("a", "b"), min_clients=2, rounds=3)
    a, b = federation.connect("a", "b")
    # Round 1: both accepted, so the hub has already looked b's secret up once.
    for client, seed in ((a, 1), (b, 2)):
        client.wait_collecting(1)
        assert client.wait_ack(client.send(b_factors(seed), 1)).accepted
    a.wait_collecting(2)
    # Another process (the CLI, its own SQLite connection) revokes b while round 2 collects.
    assert hub_main(["clients", "revoke", "b", "--state-dir", str(federation.config.state_dir)]) == 0
    assert "revoked client 'b'" in capsys.readouterr().out
    ack = b.wait_ack(b.send(b_factors(3), 2))
    assert not ack.accepted and ack.reason_code is ReasonCode.UNKNOWN_CLIENT
    assert ack.round is None  # refused before anything inside the envelope was read
    assert a.wait_ack(a.send(b_factors(4), 2)).accepted  # the others carry on
    assert federation.hub.store.rejection_counts() == {"unknown_client": 1}
    assert {r.client_id for r in federation.hub.store.receipts(2)} == {"a"}


def test_a_plain_text_secret_slipped_into_an_encrypted_database_is_never_trusted(tmp_path: Path, capsys):
    """Someone who can write hub.sqlite3 but not read the key cannot plant a secret of
    their choosing, for an existing client or a new row."""
    state = tmp_path / "hub"
    _add(capsys, state, "phone-1")
    planted = new_client_secret()
    database = sqlite3.connect(state / DATABASE_NAME)
    with database:
        database.execute("UPDATE clients SET secret = ? WHERE client_id = 'phone-1'", (planted,))
        database.execute("INSERT INTO clients (client_id, secret, created_at) VALUES ('intruder', ?, 0)", (planted,))
    database.close()
    for create in (True, False):  # the hub's own opener, and a read-only one
        with HubStore.in_state_dir(state, create=create) as store:
            assert store.secret_of("phone-1") is None
            assert store.secret_of("intruder") is None
