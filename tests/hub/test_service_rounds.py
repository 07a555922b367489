"""The hub over real brokers: rounds, weighted means, retained globals, dropout, retry, strategies."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedvlm.hub import HubConfig, HubService, StateDirMismatch
from fedvlm.hub.console import Console
from fedvlm.hub.status import read_status
from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import Presence, ReasonCode, RoundPhase
from fedvlm.shared.strategies import get_strategy
from tests.brokers import free_port
from tests.hub.fake_clients import a_factors, b_factors, fetch_global, retained_chunk_topics, weighted_mean


def assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_rounds_publish_the_weighted_mean_of_the_accepted_b_factors(start_federation, broker_kind):
    # Big enough tensors and small chunks: each global version spans several retained chunks.
    federation = start_federation(broker_kind, rounds=2, min_clients=3, chunk_size=1024, keep_updates=True)
    clients = federation.connect("a", "b", "c")
    published = {}
    for round_number in (1, 2):
        for client in clients:
            client.wait_collecting(round_number)
        updates = []
        for index, client in enumerate(clients):
            tensors, samples = b_factors(10 * round_number + index, out_features=64), 3 + 4 * index
            ack = client.wait_ack(client.send(tensors, round_number, samples))
            assert (ack.accepted, ack.reason_code, ack.round) == (True, ReasonCode.ACCEPTED, round_number)
            updates.append((tensors, samples))
        clients[0].wait_state(lambda state: state.global_version == round_number)

        # A device that joins now gets the version from the retained messages alone.
        manifest, payload = fetch_global(federation.broker, "fed")
        assert (manifest.version, manifest.round, manifest.strategy) == (round_number, round_number, "plora")
        assert manifest.chunk_count > 1
        assert tensor_codec.sha256_hex(payload) == manifest.payload_sha256 and len(payload) == manifest.total_size
        tensors, metadata = tensor_codec.decode(payload)
        assert metadata == {"federation": "fed", "version": str(round_number), "round": str(round_number),
                            "strategy": "plora"}  # fmt: skip
        assert_close(tensors, weighted_mean(updates))
        published[round_number] = (manifest, payload)

    # The previous version's retained chunks are gone; the latest one's are there.
    assert retained_chunk_topics(federation.broker, "fed", 1) == []
    assert len(retained_chunk_topics(federation.broker, "fed", 2)) == published[2][0].chunk_count
    final = clients[0].wait_state(lambda state: state.phase is RoundPhase.DONE)
    assert (final.round, final.global_version, final.selected_count) == (2, 2, 0)
    assert federation.hub.wait_finished(5)

    # What is on disk and in SQLite agrees with what was published (--keep-updates keeps update files).
    store = federation.hub.store
    for version, (manifest, payload) in published.items():
        record = store.global_version(version)
        assert record.published and record.sha256 == manifest.payload_sha256
        assert open(record.file_path, "rb").read() == payload
    for receipt in store.receipts(2):
        assert tensor_codec.sha256_hex(open(receipt.file_path, "rb").read()) == receipt.body_sha256
    status = read_status(federation.config.state_dir)
    assert (status.hub_running, status.completed_rounds, status.accepted_updates) == (True, 2, 6)
    assert status.phase == "done" and status.last_global.version == 2


def test_round_config_tells_clients_how_to_train(start_federation):
    federation = start_federation(min_clients=1, clients=("a",), local_steps=7, learning_rate=0.01,
                                  objective="dpo", dpo_beta=0.25)
    (client,) = federation.connect("a")
    state = client.wait_collecting(1)
    assert state.selected_count == 1 and state.deadline > time.time()
    assert client.wait_selected(state).deadline == state.deadline
    config = state.round_config
    assert config["strategy"] == "plora"
    assert config["lora"] == federation.config.lora.to_dict()
    assert config["lora_config_hash"] == federation.config.lora.config_hash()
    assert config["base_fingerprint"] is None  # nothing pinned before the first accepted update
    assert (config["local_steps"], config["learning_rate"], config["quorum"], config["attempt"]) == (7, 0.01, 1, 1)
    assert (config["objective"], config["dpo_beta"]) == ("dpo", 0.25)  # devices train with the federation's objective


def test_checkpoints_are_reported_where_a_crash_must_be_survivable(start_federation):
    """``on_checkpoint``: "aggregating" with the round's updates committed and no new version
    yet, then "publishing" with the version committed but not yet marked published."""
    seen: list[tuple[str, int | None, bool | None]] = []
    federation = None

    def record(point: str) -> None:
        latest = federation.hub.store.latest_global()
        seen.append((point, latest.version if latest else None, latest.published if latest else None))

    federation = start_federation(min_clients=1, clients=("a",), rounds=1, on_checkpoint=record)
    (a,) = federation.connect("a")
    a.wait_collecting(1)
    assert a.wait_ack(a.send(b_factors(1), 1)).accepted
    a.wait_state(lambda s: s.global_version == 1, timeout=10)
    assert seen == [("aggregating", None, None), ("publishing", 1, False)]


def test_a_client_that_dies_mid_round_is_waited_for_until_the_deadline(start_federation):
    federation = start_federation(min_clients=3, quorum=2, round_timeout_s=2.0, rounds=1)
    a, b, c = federation.connect("a", "b", "c")
    state = a.wait_collecting(1)
    c.close(announce_offline=False)  # gone without a word
    updates = [(b_factors(1), 4), (b_factors(2), 6)]
    for client, (tensors, samples) in zip((a, b), updates):
        assert client.wait_ack(client.send(tensors, 1, samples)).accepted
    a.wait_state(lambda s: s.global_version == 1, timeout=10)
    assert time.time() >= state.deadline - 0.05  # it did wait for c
    _, payload = fetch_global(federation.broker, "fed")
    assert_close(tensor_codec.decode(payload)[0], weighted_mean(updates))


def test_a_round_without_quorum_is_retried_keeping_what_was_accepted(start_federation):
    federation = start_federation(min_clients=3, quorum=3, round_timeout_s=1.5, rounds=1)
    a, b, c = federation.connect("a", "b", "c")
    a.wait_collecting(1)
    first = (b_factors(1), 5)
    assert a.wait_ack(a.send(first[0], 1, first[1])).accepted
    c.announce(Presence.OFFLINE)
    # Deadline: 1 of 3 accepted; with c offline only 2 clients are available, so round 1 waits.
    a.wait_state(lambda s: s.phase is RoundPhase.WAITING and s.round == 1, timeout=10)
    late = b.wait_ack(b.send(b_factors(2), 1, 7))
    assert (late.accepted, late.reason_code) == (False, ReasonCode.LATE)
    c.announce(Presence.ONLINE)
    retry = a.wait_collecting(1)
    assert retry.round_config["attempt"] == 2 and retry.selected_count == 3
    assert b.wait_selected(retry).attempt == c.wait_selected(retry).attempt == 2
    rest = [(b_factors(2), 7), (b_factors(3), 9)]
    for client, (tensors, samples) in zip((b, c), rest):
        assert client.wait_ack(client.send(tensors, 1, samples)).accepted
    a.wait_state(lambda s: s.global_version == 1)
    _, payload = fetch_global(federation.broker, "fed")
    assert_close(tensor_codec.decode(payload)[0], weighted_mean([first, *rest]))
    rounds = federation.hub.store.rounds()
    assert [(r.round, r.attempt, r.outcome) for r in rounds] == [(1, 1, "retry"), (1, 2, "aggregated")]


def test_fedex_global_carries_base_deltas_folded_forward(start_federation):
    federation = start_federation(strategy="fedex", min_clients=2, clients=("a", "b"), rounds=2)
    a, b = federation.connect("a", "b")
    strategy = get_strategy("fedex")
    previous = None
    for round_number in (1, 2):
        a.wait_collecting(round_number)
        expected = strategy.new_aggregator(federation.config.lora.scaling)
        for seed, (client, samples) in enumerate(((a, 3), (b, 5))):
            tensors = {**a_factors(seed + 10 * round_number), **b_factors(seed + 10 * round_number)}
            assert client.wait_ack(client.send(tensors, round_number, samples)).accepted
            expected.add(tensors, samples)
        a.wait_state(lambda s: s.global_version == round_number)
        tensors = tensor_codec.decode(fetch_global(federation.broker, "fed")[1])[0]
        wanted = expected.result(previous)
        assert any(name.endswith(".fedex_base_delta") for name in tensors)
        assert_close(tensors, wanted)
        previous = wanted


def test_local_strategy_collects_empty_updates_and_publishes_empty_globals(start_federation):
    federation = start_federation(strategy="local", min_clients=2, clients=("a", "b"), rounds=1)
    a, b = federation.connect("a", "b")
    a.wait_collecting(1)
    refused = a.wait_ack(a.send(b_factors(1), 1, 4))
    assert (refused.accepted, refused.reason_code) == (False, ReasonCode.INVALID_UPDATE)
    assert "shares no tensors" in refused.reason_text
    for client in (a, b):
        assert client.wait_ack(client.send({}, 1, 4)).accepted
    a.wait_state(lambda s: s.global_version == 1)
    manifest, payload = fetch_global(federation.broker, "fed")
    assert tensor_codec.decode(payload)[0] == {} and manifest.strategy == "local"


def test_serve_keeps_the_embedded_broker_until_clients_have_left(start_federation):
    federation = start_federation(min_clients=1, clients=("a",), rounds=1, done_linger_s=30.0)
    (a,) = federation.connect("a")
    serving = threading.Thread(target=federation.hub.serve)
    serving.start()
    a.wait_collecting(1)
    assert a.wait_ack(a.send(b_factors(1), 1, 4)).accepted
    a.wait_state(lambda s: s.phase is RoundPhase.DONE)
    serving.join(0.5)
    assert serving.is_alive()  # a is still online and may not have the last global yet
    a.announce(Presence.OFFLINE)
    serving.join(10)
    assert not serving.is_alive()


def test_a_state_dir_serves_only_its_own_federation(tmp_path):
    settings = {"state_dir": tmp_path, "embedded_port": free_port(), "min_clients": 1}
    HubService(HubConfig(federation="first", **settings), console=Console(enabled=False)).start().stop()
    for changes, words in (({"federation": "second"}, "federation 'first'"), ({"strategy": "fedsa"}, "strategy"),
                           ({"lora": {"r": 16}}, "LoRA settings")):  # fmt: skip
        config = HubConfig(**{"federation": "first", **settings, **changes})
        with pytest.raises(StateDirMismatch, match=words):
            HubService(config, console=Console(enabled=False)).start()
    # A refused start leaves nothing running: the port is free for the next hub.
    HubService(HubConfig(federation="first", **settings), console=Console(enabled=False)).start().stop()
