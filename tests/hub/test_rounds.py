"""The round lifecycle without MQTT: selection, quorum, deadline, retry, completion."""

from __future__ import annotations

import pytest

from fedvlm.hub.rounds import LifecyclePhase, OpenRound, Outcome, RoundLifecycle, RoundPolicy

CLIENTS = [f"c{i}" for i in range(10)]


def test_selection_is_seeded_sorted_and_sized_by_fraction():
    policy = RoundPolicy(min_clients=2, fraction=0.3, seed=1)
    first = policy.select(CLIENTS, round_number=1, attempt=1)
    assert len(first) == 3 and list(first) == sorted(first) and set(first) <= set(CLIENTS)
    assert policy.select(list(reversed(CLIENTS)), 1, 1) == first  # order of arrival does not matter
    assert RoundPolicy(min_clients=2, fraction=0.3, seed=1).select(CLIENTS, 1, 1) == first
    draws = {policy.select(CLIENTS, r, 1) for r in range(1, 8)}
    assert len(draws) > 1  # each round draws anew


def test_selection_respects_min_clients_quorum_and_availability():
    assert len(RoundPolicy(min_clients=4, fraction=0.1).select(CLIENTS, 1, 1)) == 4
    assert len(RoundPolicy(min_clients=1, fraction=0.1, quorum=5).select(CLIENTS, 1, 1)) == 5
    assert len(RoundPolicy(min_clients=1, fraction=1.0).select(CLIENTS[:3], 1, 1)) == 3


def test_default_quorum_is_half_the_selected_rounded_up():
    policy = RoundPolicy()
    assert [policy.quorum_for(n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert RoundPolicy(quorum=2).quorum_for(5) == 2


def test_round_outcomes_all_answered_deadline_and_quorum():
    open_round = OpenRound(number=1, attempt=1, selected=("a", "b", "c"), quorum=2, opened_at=0.0, deadline=10.0)
    assert open_round.outcome(5.0) is Outcome.COLLECTING
    open_round.record("a")
    assert open_round.outcome(10.0) is Outcome.RETRY  # deadline, 1 of 2 needed
    open_round.record("b")
    assert open_round.outcome(9.9) is Outcome.COLLECTING
    assert open_round.outcome(10.0) is Outcome.AGGREGATE  # deadline with a quorum: the dropout case
    open_round.record("c")
    assert open_round.outcome(0.0) is Outcome.AGGREGATE  # everyone answered: no need to wait
    with pytest.raises(ValueError, match="not selected"):
        open_round.record("z")


def test_lifecycle_waits_opens_completes_and_finishes():
    lifecycle = RoundLifecycle(RoundPolicy(min_clients=2, round_timeout_s=30, rounds=2))
    assert (lifecycle.phase, lifecycle.round_number) == (LifecyclePhase.WAITING, 1)
    assert lifecycle.try_open({"a"}, now=0.0) is None
    opened = lifecycle.try_open({"a", "b"}, now=100.0)
    assert (opened.number, opened.attempt, opened.selected, opened.deadline) == (1, 1, ("a", "b"), 130.0)
    assert lifecycle.phase is LifecyclePhase.COLLECTING
    assert lifecycle.try_open({"a", "b"}, now=101.0) is None  # one round at a time
    opened.record("a")
    opened.record("b")
    assert lifecycle.outcome(101.0) is Outcome.AGGREGATE
    assert lifecycle.complete() is opened
    assert (lifecycle.phase, lifecycle.round_number) == (LifecyclePhase.WAITING, 2)
    second = lifecycle.try_open({"a", "b"}, now=200.0)
    assert (second.number, second.attempt) == (2, 1)
    lifecycle.complete()
    assert (lifecycle.phase, lifecycle.round_number) == (LifecyclePhase.DONE, 2)
    assert lifecycle.try_open({"a", "b"}, now=300.0) is None


def test_retry_keeps_accepted_updates_and_reselects():
    lifecycle = RoundLifecycle(RoundPolicy(min_clients=3, quorum=3, round_timeout_s=10))
    first = lifecycle.try_open({"a", "b", "c"}, now=0.0)
    first.record("a")
    assert lifecycle.outcome(10.0) is Outcome.RETRY
    lifecycle.retry()
    assert (lifecycle.phase, lifecycle.round_number, lifecycle.next_attempt) == (LifecyclePhase.WAITING, 1, 2)
    # "a" already answered, so it counts towards the clients needed even while offline.
    assert lifecycle.try_open({"b"}, now=11.0) is None
    second = lifecycle.try_open({"b", "c"}, now=12.0)
    assert (second.number, second.attempt, second.selected, second.answered) == (1, 2, ("a", "b", "c"), {"a"})
    assert second.deadline == 22.0
    second.record("b")
    second.record("c")
    assert lifecycle.outcome(12.5) is Outcome.AGGREGATE
    lifecycle.complete()
    assert (lifecycle.round_number, lifecycle.next_attempt, lifecycle.carried) == (2, 1, set())


def test_lifecycle_resumes_an_open_round():
    current = OpenRound(number=3, attempt=2, selected=("a", "b"), quorum=1, opened_at=0.0, deadline=50.0,
                        answered={"a"})  # fmt: skip
    lifecycle = RoundLifecycle(RoundPolicy(rounds=3), completed_rounds=2, current=current)
    assert (lifecycle.phase, lifecycle.round_number) == (LifecyclePhase.COLLECTING, 3)
    assert lifecycle.outcome(50.0) is Outcome.AGGREGATE
    lifecycle.complete()
    assert lifecycle.phase is LifecyclePhase.DONE


def test_complete_or_retry_without_an_open_round_is_a_bug():
    lifecycle = RoundLifecycle(RoundPolicy())
    with pytest.raises(RuntimeError, match="no round is open"):
        lifecycle.complete()
    with pytest.raises(RuntimeError, match="no round is open"):
        lifecycle.retry()
