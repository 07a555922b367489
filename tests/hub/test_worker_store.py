"""The hub database's side of hub workers: partial sums committed with receipts, sealing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedvlm.hub.errors import RoundNotCollecting
from fedvlm.hub.store import HubStore, Receipt, RoundRecord
from fedvlm.shared.protocol import Topics


@pytest.fixture
def store(tmp_path: Path):
    with HubStore.in_state_dir(tmp_path / "state") as opened:
        opened.open_round(RoundRecord(round=1, attempt=1, selected=("a", "b", "c"), quorum=3, deadline=1e12,
                                      opened_at=0.0))  # fmt: skip
        yield opened


def receipt(client: str, round_number: int = 1) -> Receipt:
    return Receipt(round=round_number, client_id=client, attempt=1, message_id="0" * 32, payload_sha256="aa",
                   body_sha256="bb", sample_count=3, file_path="", accepted_at=1.0)  # fmt: skip


def test_a_workers_batch_commits_its_receipts_with_its_partial_sum(store: HubStore):
    store.commit_worker_batch("worker-0", 1, [receipt("a"), receipt("b")], b"sum-ab", 2, 1.0)
    store.commit_worker_batch("worker-1", 1, [receipt("c")], b"sum-c", 1, 1.0)
    assert store.worker_partial(1, "worker-0") == (b"sum-ab", 2)
    assert [r.client_id for r in store.worker_receipts(1, "worker-0")] == ["a", "b"]
    assert [r.client_id for r in store.worker_receipts(1, "worker-1")] == ["c"]
    assert store.answered_clients(1) == {"a", "b", "c"}
    partials, receipts = store.seal_worker_partials(1, 2.0)
    assert partials == [("worker-0", b"sum-ab", 2), ("worker-1", b"sum-c", 1)] and receipts == 3


def test_a_client_counts_once_across_workers_and_a_failed_batch_leaves_nothing(store: HubStore):
    store.commit_worker_batch("worker-0", 1, [receipt("a")], b"sum-a", 1, 1.0)
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_worker_batch("worker-1", 1, [receipt("b"), receipt("a")], b"sum-ba", 2, 1.0)
    assert store.worker_partial(1, "worker-1") is None
    assert store.answered_clients(1) == {"a"}


def test_a_sealed_or_closed_round_takes_no_more_commits(store: HubStore):
    store.commit_worker_batch("worker-0", 1, [receipt("a")], b"sum-a", 1, 1.0)
    store.seal_worker_partials(1, 2.0)
    with pytest.raises(RoundNotCollecting):
        store.commit_worker_batch("worker-0", 1, [receipt("b")], b"sum-ab", 2, 3.0)
    store.unseal_round(1)  # a coordinator resuming the round before it aggregated
    store.commit_worker_batch("worker-0", 1, [receipt("b")], b"sum-ab", 2, 3.0)
    store.close_round_for_retry(1, 1, 4.0)
    with pytest.raises(RoundNotCollecting):
        store.commit_worker_batch("worker-0", 1, [receipt("c")], b"sum-abc", 3, 5.0)
    with pytest.raises(RoundNotCollecting):
        store.commit_worker_batch("worker-0", 2, [receipt("c", 2)], b"sum-c", 1, 5.0)  # never opened
    store.drop_worker_partials(1)
    assert store.worker_partial(1, "worker-0") is None and store.worker_receipts(1, "worker-0") == []


def test_relay_topics_name_the_owner_and_parse_back_to_the_update():
    topics = Topics("fed")
    message_id = bytes(range(16))
    relay = topics.worker_relay(3, "c01", message_id)
    assert relay == f"fedvlm/v1/fed/hub/workers/3/c01/{message_id.hex()}"
    assert topics.worker_relay_filter(3) == "fedvlm/v1/fed/hub/workers/3/+/+"
    parsed = topics.parse_worker_relay(relay)
    assert (parsed.client_id, parsed.message_id) == ("c01", message_id)
    assert parsed == topics.parse(topics.update("c01", message_id))
    for bad in (f"fedvlm/v1/fed/hub/workers/x/c01/{message_id.hex()}", "fedvlm/v1/other/hub/workers/3/c01/00",
                f"fedvlm/v1/fed/hub/workers/3/c01/{message_id.hex()}/extra"):
        with pytest.raises(ValueError):
            topics.parse_worker_relay(bad)
