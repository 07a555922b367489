"""Norm bounding: one poisoning client cannot pull the global B further than the bound,
and honest rounds come out exactly as without bounding."""

from __future__ import annotations

import numpy as np
import pytest

from fedvlm.hub.cli import _start_config, build_parser
from fedvlm.hub.config import HubConfig
from fedvlm.hub.console import Console
from fedvlm.hub.errors import HubConfigError
from fedvlm.hub.norm_bound import (NormBoundedAggregator, NormBoundedStrategy, NormBoundRule, NormHistory,
                                   update_displacement)
from fedvlm.hub.service import HubService
from fedvlm.hub.status import read_status
from fedvlm.shared import tensor_codec
from fedvlm.shared.protocol import ReasonCode, RoundPhase
from fedvlm.shared.aggregation import AggregationError
from fedvlm.shared.strategies import get_strategy
from tests.hub.fake_clients import b_factors, fetch_global, weighted_mean

ATTACK = 1000.0  # the poisoner's B: a thousand times an honest one


def norm(tensors) -> float:
    return update_displacement(tensors, None)


def minus(x, y):
    return {name: np.asarray(x[name], np.float64) - np.asarray(y[name], np.float64) for name in x}


def small_step(reference, seed):
    """An honest round-2 update: the global B plus a small local change."""
    return {name: (reference[name] + 0.1 * noise).astype(np.float32) for name, noise in b_factors(seed).items()}


def received_global(federation, version):
    a = federation.clients["a"]
    a.wait_state(lambda s: s.global_version == version, timeout=30)
    manifest, payload = fetch_global(federation.broker, "fed")
    assert manifest.version == version
    return tensor_codec.decode(payload)[0]


def test_a_poisoner_moves_the_global_b_by_at_most_the_bound_in_each_round(start_federation):
    max_norm, factor = 20.0, 5.0
    federation = start_federation(clients=("a", "b", "m"), min_clients=3, rounds=2, max_update_norm=max_norm,
                                  norm_factor=factor)  # fmt: skip
    a, b, m = federation.connect("a", "b", "m")

    # Round 1 (no history): the absolute bound clips the poisoner; honest updates pass.
    a.wait_collecting(1)
    honest1 = {"a": ({k: 0.1 * v for k, v in b_factors(1).items()}, 10),
               "b": ({k: 0.1 * v for k, v in b_factors(2).items()}, 30)}  # fmt: skip
    poison1 = ({k: ATTACK * np.ones_like(v) for k, v in b_factors(3).items()}, 20)
    for client, (tensors, weight) in ((a, honest1["a"]), (b, honest1["b"]), (m, poison1)):
        assert client.wait_ack(client.send(tensors, 1, weight)).accepted  # clip: accepted, scaled down
    global1 = received_global(federation, 1)
    share = poison1[1] / 60
    # The pull of m: the global minus the one m would have made by sending the reference
    # itself (zeros before the first global), i.e. no change at all.
    neutral1 = weighted_mean([*honest1.values(), ({k: np.zeros_like(v) for k, v in poison1[0].items()}, 20)])
    pull1 = norm(minus(global1, neutral1))
    assert pull1 <= max_norm * share * (1 + 1e-5)
    assert pull1 == pytest.approx(max_norm * share, rel=1e-4)  # clipped onto the bound, not dropped
    unbounded = norm(minus(weighted_mean([*honest1.values(), poison1]), neutral1))
    assert unbounded > 100 * pull1  # what the rule prevented

    # Round 2: the relative bound (5 x round 1's median update norm) is now the tighter one.
    a.wait_collecting(2)
    median1 = float(np.median([norm(honest1["a"][0]), norm(honest1["b"][0]), norm(poison1[0])]))
    bound2 = min(max_norm, factor * median1)
    assert bound2 < max_norm
    honest2 = {"a": (small_step(global1, 4), 10), "b": (small_step(global1, 5), 30)}
    assert max(norm(minus(t, global1)) for t, _ in honest2.values()) < bound2  # honest ones are inside it
    poison2 = ({k: global1[k] - ATTACK * np.ones_like(v) for k, v in global1.items()}, 20)
    for client, (tensors, weight) in ((a, honest2["a"]), (b, honest2["b"]), (m, poison2)):
        assert client.wait_ack(client.send(tensors, 2, weight)).accepted
    global2 = received_global(federation, 2)
    neutral2 = weighted_mean([*honest2.values(), (global1, 20)])
    pull2 = norm(minus(global2, neutral2))
    assert pull2 <= bound2 * share * (1 + 1e-5)
    assert pull2 == pytest.approx(bound2 * share, rel=1e-4)
    # Honest updates entered unclipped: the global is exactly the mean with m's update
    # scaled onto the bound.
    clipped = {k: global1[k] + (poison2[0][k] - global1[k]) * bound2 / norm(minus(poison2[0], global1))
               for k in global1}  # fmt: skip
    expected = weighted_mean([*honest2.values(), (clipped, 20)])
    for name in expected:
        np.testing.assert_allclose(global2[name], expected[name], rtol=1e-5, atol=1e-6)
    a.wait_state(lambda s: s.phase is RoundPhase.DONE)


def test_reject_mode_refuses_the_poisoner_and_the_round_completes_from_the_others(start_federation):
    federation = start_federation(clients=("a", "b", "m"), min_clients=3, quorum=2, rounds=1, max_update_norm=20.0,
                                  norm_action="reject", round_timeout_s=8.0)  # fmt: skip
    a, b, m = federation.connect("a", "b", "m")
    a.wait_collecting(1)
    honest = [(b_factors(1), 10), (b_factors(2), 30)]
    for client, (tensors, weight) in zip((a, b), honest):
        assert client.wait_ack(client.send(tensors, 1, weight)).accepted
    ack = m.wait_ack(m.send({k: ATTACK * np.ones_like(v) for k, v in b_factors(3).items()}, 1, 20))
    assert (ack.accepted, ack.reason_code) == (False, ReasonCode.INVALID_UPDATE)
    assert "bound" in ack.reason_text
    tensors = received_global(federation, 1)  # at the deadline, from the quorum
    expected = weighted_mean(honest)
    for name in expected:
        np.testing.assert_allclose(tensors[name], expected[name], rtol=1e-5, atol=1e-6)
    assert read_status(federation.config.state_dir).rejections == {"invalid_update": 1}


def test_honest_updates_inside_the_bound_aggregate_exactly_as_without_it():
    rule = NormBoundRule(max_update_norm=50.0, norm_factor=5.0)
    reference = b_factors(0)
    bounded = NormBoundedAggregator(get_strategy("plora").new_aggregator(2.0), rule, lambda: rule.bound(1.0),
                                    lambda: reference)  # fmt: skip
    plain = get_strategy("plora").new_aggregator(2.0)
    for seed, weight in ((1, 3), (2, 8), (3, 5)):
        update = small_step(reference, seed)
        bounded.add(update, weight)
        plain.add(update, weight)
    assert bounded.clipped == 0
    for name, value in plain.result(None).items():
        np.testing.assert_array_equal(bounded.result(None)[name], value)


def test_garbage_is_refused_not_clipped_into_something_acceptable():
    rule = NormBoundRule(max_update_norm=1.0)
    bounded = NormBoundedAggregator(get_strategy("plora").new_aggregator(2.0), rule, lambda: 1.0, lambda: None)
    for poison in (np.nan, np.inf, 1e35):
        with pytest.raises(ValueError):
            bounded.add({k: np.full_like(v, poison) for k, v in b_factors(1).items()}, 10)
    assert bounded.count == 0


@pytest.mark.parametrize("strategy", ["plora", "fedit", "fedex"])
@pytest.mark.parametrize("bound", [None, 1.0, 1e12])
@pytest.mark.parametrize("action", ["clip", "reject"])
def test_garbage_is_refused_as_garbage_whatever_the_bound_and_the_strategy(strategy, bound, action):
    """NaN, Inf and overflowing values are refused by the plain checks (their message, not the
    bound's), within the bound or over it, and leave nothing behind: no update, no norm.
    Within the bound the wrapped aggregator's own checks refuse them."""
    from tests.hub.fake_clients import a_factors

    rule = NormBoundRule(max_update_norm=1.0, action=action)
    bounded = NormBoundedAggregator(get_strategy(strategy).new_aggregator(2.0), rule, lambda: bound,
                                    lambda: None)  # fmt: skip
    shared = get_strategy(strategy).shared_factors
    honest = {name: array for name, array in {**a_factors(1), **b_factors(1)}.items()
              if (".lora_A." in name and "A" in shared) or (".lora_B." in name and "B" in shared)}  # fmt: skip
    for poison in (np.nan, np.inf, 1e35):
        garbage = {name: (np.full_like(array, poison) if ".lora_B." in name else array)
                   for name, array in honest.items()}  # fmt: skip
        with pytest.raises(AggregationError, match="NaN or Inf|exceeds") as refused:
            bounded.add(garbage, 10)
        assert "bound" not in str(refused.value)
    assert bounded.count == 0 and list(bounded.norms) == [] and bounded.clipped == 0
    with pytest.raises(AggregationError, match="weight must be positive"):
        bounded.add({name: array * 0.001 for name, array in honest.items()}, 0)
    bounded.add({name: array * 0.001 for name, array in honest.items()}, 10)  # an honest one still goes in
    assert bounded.count == 1 and len(bounded.norms) == 1


def test_the_history_is_read_once_a_round_and_each_round_gets_its_own_bound():
    """The bound is asked at every add (thousands a round at scale): it must not read the
    history each time, yet a new round must see the median its predecessor recorded."""
    saved: dict[str, str] = {}
    reads = []
    history = NormHistory(load=lambda: reads.append(1) or saved.get("m"), save=lambda text: saved.update(m=text))
    round_number = [1]
    strategy = NormBoundedStrategy(get_strategy("plora"), NormBoundRule(norm_factor=5.0), history,
                                   reference=lambda: None, round_number=lambda: round_number[0])  # fmt: skip
    aggregator = strategy.new_aggregator(2.0)
    for seed in range(20):
        aggregator.add(b_factors(seed), 10)
    assert len(reads) == 1 and strategy.current_bound() is None  # round 1: no history, no bound
    history.record(1, aggregator.norms)
    assert strategy.current_bound() is None  # still round 1: its own median never bounds it
    round_number[0] = 2
    assert strategy.current_bound() == pytest.approx(5.0 * float(np.median(aggregator.norms)))
    assert len(reads) == 3  # record's own read, and round 2's


@pytest.mark.parametrize("rule, median, bound", [
    (NormBoundRule(), None, None),                      # default, first round: nothing to compare with
    (NormBoundRule(), 2.0, 10.0),                       # default: 5 x the previous median
    (NormBoundRule(max_update_norm=3.0), 2.0, 3.0),     # the tighter of the two
    (NormBoundRule(max_update_norm=3.0, norm_factor=0), 2.0, 3.0),
    (NormBoundRule(norm_factor=0), 2.0, None),          # off
])  # fmt: skip
def test_the_bound_is_the_tighter_of_the_absolute_and_the_relative_one(rule, median, bound):
    assert rule.bound(median) == bound


def test_a_restarted_hub_rebuilds_the_round_with_the_poisoner_clipped_the_same_way(start_federation):
    """The hub stores update bodies as received (unclipped); a restarted hub re-adds them
    through the same rule against the same reference, so the clipped round is rebuilt exactly."""
    max_norm = 20.0
    federation = start_federation(clients=("a", "b", "m"), min_clients=3, rounds=1, max_update_norm=max_norm)
    a, b, m = federation.connect("a", "b", "m")
    a.wait_collecting(1)
    honest = [({k: 0.1 * v for k, v in b_factors(1).items()}, 10), ({k: 0.1 * v for k, v in b_factors(2).items()}, 30)]
    poison = ({k: ATTACK * np.ones_like(v) for k, v in b_factors(3).items()}, 20)
    assert m.wait_ack(m.send(poison[0], 1, poison[1])).accepted
    assert a.wait_ack(a.send(honest[0][0], 1, honest[0][1])).accepted

    federation.hub.stop()  # the embedded broker stops with it; the clients reconnect to the new one
    federation.hub = HubService(federation.config, console=Console()).start()
    a.wait_state(lambda s: s.status.value == "online" and s.phase is RoundPhase.COLLECTING, timeout=30)
    assert b.wait_ack(b.send(honest[1][0], 1, honest[1][1]), timeout=30).accepted
    tensors = received_global(federation, 1)
    clipped = {k: v * max_norm / norm(poison[0]) for k, v in poison[0].items()}  # reference: zeros in round 1
    expected = weighted_mean([*honest, (clipped, poison[1])])
    for name in expected:
        np.testing.assert_allclose(tensors[name], expected[name], rtol=1e-5, atol=1e-6)


def test_start_flags_and_config_set_the_rule_and_refuse_nonsense(tmp_path):
    args = build_parser().parse_args(["start", "--state-dir", str(tmp_path), "--max-update-norm", "3.5",
                                      "--norm-factor", "0", "--norm-action", "reject"])  # fmt: skip
    assert _start_config(args).norm_bound == NormBoundRule(max_update_norm=3.5, norm_factor=0.0, action="reject")
    assert HubConfig().norm_bound == NormBoundRule(max_update_norm=None, norm_factor=5.0, action="clip")
    for bad in ({"norm_action": "drop"}, {"norm_factor": -1.0}, {"max_update_norm": 0.0},
                {"max_update_norm": float("nan")}):  # fmt: skip
        with pytest.raises(HubConfigError):
            HubConfig(**bad)


@pytest.mark.parametrize("strategy", ["fedit", "fedsa"])
def test_before_the_first_global_only_zero_initialised_factors_are_bounded(strategy):
    """Round 1 has no global version to measure from: lora_A starts from a random shared
    initialisation the hub cannot rebuild, so it is left alone (never shrunk towards zero);
    lora_B starts at zero and is bounded as usual."""
    from tests.hub.fake_clients import a_factors

    rule = NormBoundRule(max_update_norm=0.5)
    aggregator = NormBoundedAggregator(get_strategy(strategy).new_aggregator(2.0), rule, lambda: 0.5, lambda: None)
    honest_a = {name: array * 10 for name, array in a_factors(1).items()}  # a random init is far from zero
    huge_b = {name: array * 1000 for name, array in b_factors(1).items()}
    update = {**honest_a, **huge_b} if strategy == "fedit" else honest_a
    aggregator.add(update, 3)
    result = aggregator.result(None)
    for name, array in honest_a.items():
        np.testing.assert_allclose(result[name], array, rtol=1e-6)  # A not shrunk (float32 mean of one)
    if strategy == "fedit":
        assert update_displacement({n: result[n] for n in huge_b}, None) == pytest.approx(0.5, rel=1e-5)
        assert aggregator.clipped == 1
    else:
        assert list(aggregator.norms) == []  # nothing measurable: no median from it either


def test_an_overstated_sample_count_buys_no_more_than_the_bound(start_federation):
    """--max-samples: a client claiming a million samples weighs as the bound, so it cannot
    drown the honest updates by overstating; the receipt keeps what it claimed."""
    from fedvlm.hub.store import HubStore

    federation = start_federation(clients=("a", "b", "m"), min_clients=3, rounds=1, max_sample_count=50,
                                  norm_factor=0.0)  # fmt: skip
    a, b, m = federation.connect("a", "b", "m")
    a.wait_collecting(1)
    honest = [(b_factors(1), 10), (b_factors(2), 30)]
    for client, (tensors, weight) in zip((a, b), honest):
        assert client.wait_ack(client.send(tensors, 1, weight)).accepted
    overstated = b_factors(3)
    assert m.wait_ack(m.send(overstated, 1, 1_000_000)).accepted
    tensors = received_global(federation, 1)
    expected = weighted_mean([*honest, (overstated, 50)])  # as if it had claimed 50
    for name in expected:
        np.testing.assert_allclose(tensors[name], expected[name], rtol=1e-5, atol=1e-6)
    with HubStore.in_state_dir(federation.config.state_dir, create=False) as store:
        assert {r.client_id: r.sample_count for r in store.receipts(1)} == {"a": 10, "b": 30, "m": 1_000_000}


def test_the_sample_bound_flag_and_config_key(tmp_path):
    args = build_parser().parse_args(["start", "--state-dir", str(tmp_path), "--max-samples", "500"])
    assert _start_config(args).max_sample_count == 500
    assert HubConfig().max_sample_count is None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(HubConfigError, match="max_sample_count"):
            HubConfig(max_sample_count=bad)
