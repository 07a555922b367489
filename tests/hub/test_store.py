"""HubStore: durable settings, the client registry, rounds, receipts, rejections, global versions."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from fedvlm.hub.errors import ClientRegistryError, HubError, StateDirMismatch
from fedvlm.hub.store import (
    RECENT_REJECTIONS_KEPT,
    GlobalVersionRecord,
    HubStore,
    Receipt,
    RejectionRecord,
    RoundRecord,
)


@pytest.fixture
def store(tmp_path: Path):
    with HubStore.in_state_dir(tmp_path / "state") as store:
        yield store


def receipt(round_number: int, client: str, sha: str = "aa", *, attempt: int = 1) -> Receipt:
    return Receipt(round=round_number, client_id=client, attempt=attempt, message_id="0" * 32, payload_sha256=sha,
                   body_sha256="bb", sample_count=5, file_path=f"/x/{client}", accepted_at=1.0)  # fmt: skip


def test_database_is_private_durable_and_in_wal_mode(store: HubStore):
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_opening_without_create_needs_an_existing_database(tmp_path: Path):
    with pytest.raises(HubError, match="no hub state"):
        HubStore.in_state_dir(tmp_path / "missing", create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "hub.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(HubError, match="not a usable hub database"):
        HubStore.in_state_dir(tmp_path / "junk")


def test_clients_register_once_and_revoked_ones_lose_their_secret(store: HubStore):
    store.add_client("alice", "s" * 43, now=10.0)
    assert store.secret_of("alice") == "s" * 43
    assert store.secret_of("bob") is None
    with pytest.raises(ClientRegistryError, match="already registered"):
        store.add_client("alice", "t" * 43, now=11.0)
    store.revoke_client("alice", now=12.0)
    assert store.secret_of("alice") is None
    assert store.active_client_ids() == set()
    (record,) = store.list_clients()
    assert (record.client_id, record.active, record.revoked_at) == ("alice", False, 12.0)
    with pytest.raises(ClientRegistryError, match="already revoked"):
        store.add_client("alice", "u" * 43, now=13.0)
    with pytest.raises(ClientRegistryError, match="not registered"):
        store.revoke_client("alice", now=14.0)
    # The secret is gone from the database file itself, not just hidden.
    assert store._conn.execute("SELECT secret FROM clients").fetchone()[0] is None


def test_presence_is_recorded_and_reset(store: HubStore):
    store.add_client("alice", "s" * 43, now=1.0)
    store.set_presence("alice", "online", now=5.0)
    assert (store.list_clients()[0].presence, store.list_clients()[0].last_seen) == ("online", 5.0)
    store.reset_presence()
    assert store.list_clients()[0].presence == "offline"


def test_state_dir_belongs_to_one_federation(store: HubStore):
    store.bind_federation("fed", "plora", "hash1")
    store.bind_federation("fed", "plora", "hash1")  # same again is fine
    with pytest.raises(StateDirMismatch, match="federation 'fed'"):
        store.bind_federation("other", "plora", "hash1")
    with pytest.raises(StateDirMismatch, match="strategy 'plora'"):
        store.bind_federation("fed", "fedit", "hash1")
    with pytest.raises(StateDirMismatch, match="LoRA settings"):
        store.bind_federation("fed", "plora", "hash2")


def test_rounds_open_retry_and_latest(store: HubStore):
    assert store.latest_round() is None and store.completed_rounds() == 0
    store.open_round(RoundRecord(1, 1, ("a", "b"), 1, deadline=50.0, opened_at=10.0))
    latest = store.latest_round()
    assert latest.is_open and latest.selected == ("a", "b")
    store.extend_deadline(1, 1, 99.0)
    store.close_round_for_retry(1, 1, now=100.0)
    store.open_round(RoundRecord(1, 2, ("a", "b", "c"), 2, deadline=200.0, opened_at=101.0))
    latest = store.latest_round()
    assert (latest.round, latest.attempt, latest.is_open) == (1, 2, True)
    assert [(r.attempt, r.outcome, r.deadline) for r in store.rounds()] == [(1, "retry", 99.0), (2, None, 200.0)]
    assert store.completed_rounds() == 0


def test_one_receipt_per_client_and_round_and_pins_commit_with_it(store: HubStore):
    store.add_receipt(receipt(1, "a"), pins={"base_fingerprint": "base-1"})
    assert store.get_meta("base_fingerprint") == "base-1"
    with pytest.raises(sqlite3.IntegrityError):
        store.add_receipt(receipt(1, "a", sha="cc"), pins={"base_fingerprint": "base-2"})
    assert store.get_meta("base_fingerprint") == "base-1"  # the failed transaction pinned nothing
    store.add_receipt(receipt(2, "a"))
    store.add_receipt(receipt(1, "b"))
    assert [r.client_id for r in store.receipts(1)] == ["a", "b"]
    assert store.receipt(1, "a").payload_sha256 == "aa"
    assert store.count_receipts() == 3
    store.delete_receipt(1, "a")
    assert store.receipt(1, "a") is None


def test_rejections_are_counted_and_the_log_stays_bounded(store: HubStore):
    for index in range(RECENT_REJECTIONS_KEPT + 30):
        store.record_rejection(RejectionRecord(at=float(index), client_id="a", round=1,
                                               reason="bad_signature" if index % 2 else "duplicate",
                                               detail=f"#{index}"))  # fmt: skip
    assert store.rejection_counts() == {"bad_signature": 115, "duplicate": 115}
    assert store._conn.execute("SELECT COUNT(*) FROM recent_rejections").fetchone()[0] == RECENT_REJECTIONS_KEPT
    assert store.recent_rejections(2)[0].detail == f"#{RECENT_REJECTIONS_KEPT + 29}"


def test_a_global_version_closes_its_round_in_the_same_transaction(store: HubStore):
    store.open_round(RoundRecord(1, 1, ("a",), 1, deadline=50.0, opened_at=10.0))
    record = GlobalVersionRecord(version=1, round=1, sha256="f" * 64, file_path="/g/v1", total_size=10,
                                 chunk_count=1, chunk_size=1024, manifest="{}", created_at=20.0, published=False)
    store.add_global_version(record, closes_attempt=1, now=20.0)
    (closed,) = store.rounds()
    assert (closed.outcome, closed.global_version, closed.closed_at) == ("aggregated", 1, 20.0)
    assert store.completed_rounds() == 1
    assert store.latest_global().published is False
    store.mark_published(1)
    assert store.latest_global().published is True
    assert store.global_version(1).sha256 == "f" * 64 and store.global_version(2) is None
    with pytest.raises(sqlite3.IntegrityError):  # a version is written once
        store.add_global_version(record, closes_attempt=1, now=21.0)


def test_a_round_sample_total_sums_only_that_round_receipts(store: HubStore):
    assert store.round_sample_total(1) == 0  # no receipts: zero, not None
    store.commit_accepted(1, [receipt(1, "a"), receipt(1, "b")], b"sum-of-2", 2, now=2.0)
    store.commit_accepted(2, [receipt(2, "a")], b"sum-of-1", 1, now=3.0)
    assert store.round_sample_total(1) == 10 and store.round_sample_total(2) == 5


def test_a_second_connection_sees_committed_state(tmp_path: Path):
    with HubStore.in_state_dir(tmp_path) as writer, HubStore.in_state_dir(tmp_path, create=False) as reader:
        writer.add_client("alice", "s" * 43, now=1.0)
        assert reader.secret_of("alice") == "s" * 43


def test_a_batch_of_receipts_commits_with_the_round_running_sum_or_not_at_all(store: HubStore):
    store.commit_accepted(1, [receipt(1, "a"), receipt(1, "b")], b"sum-of-2", 2, now=2.0, pins={"base_fingerprint": "b1"})
    assert store.round_aggregate(1) == (b"sum-of-2", 2) and store.count_round_receipts(1) == 2
    with pytest.raises(sqlite3.IntegrityError):  # "a" again: the whole batch fails, the sum with it
        store.commit_accepted(1, [receipt(1, "c"), receipt(1, "a")], b"sum-of-4", 4, now=3.0)
    assert store.round_aggregate(1) == (b"sum-of-2", 2) and store.count_round_receipts(1) == 2
    assert store.get_meta("base_fingerprint") == "b1"
    store.open_round(RoundRecord(round=1, attempt=1, selected=("a", "b"), quorum=1, deadline=9.0, opened_at=1.0))
    version = GlobalVersionRecord(version=1, round=1, sha256="0" * 64, file_path="/g", total_size=1, chunk_count=1,
                                  chunk_size=1024, manifest="{}", created_at=4.0, published=False)  # fmt: skip
    store.add_global_version(version, closes_attempt=1, now=4.0)
    assert store.round_aggregate(1) is None  # the version holds the round now: disk stays bounded


def test_a_state_dir_of_schema_1_is_migrated_in_place(tmp_path: Path):
    with HubStore.in_state_dir(tmp_path) as store:
        store.add_receipt(receipt(1, "a"))
    with sqlite3.connect(tmp_path / "hub.sqlite3") as old:  # as an older hub left it
        old.execute("DROP TABLE round_aggregates")
        old.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with HubStore.in_state_dir(tmp_path, create=False) as reader:  # a reader (status) leaves it as it is
        assert reader.get_meta("schema_version") == "1" and reader.count_receipts() == 1
    with HubStore.in_state_dir(tmp_path) as store:  # the hub migrates it
        assert store.get_meta("schema_version") == "2"
        assert store.receipt(1, "a").file_path == "/x/a" and store.round_aggregate(1) is None
