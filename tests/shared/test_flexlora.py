"""FlexLoRA: devices of different rank, the exact mean of their updates, each device's best rank-r_i share of it."""

from __future__ import annotations

import numpy as np
import pytest

from fedvlm.shared.aggregation import AggregationError
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.strategies import build_strategy, get_strategy
from fedvlm.shared.tensor_codec import TensorMismatchError
from fedvlm.shared.usage_error import UsageError

MODULES = ("lm.layers.0.self_attn.q_proj", "lm.layers.0.self_attn.v_proj")
OUT, IN, MAX_RANK = 6, 7, 4


def device(seed: int, rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for module in MODULES:
        state[f"{module}.lora_A.weight"] = rng.standard_normal((rank, IN)).astype(np.float32)
        state[f"{module}.lora_B.weight"] = rng.standard_normal((OUT, rank)).astype(np.float32)
    return state


def flexlora():
    return build_strategy("flexlora", {}, LoraSettings(r=MAX_RANK, alpha=8))


def product(state, module):
    return state[f"{module}.lora_B.weight"].astype(np.float64) @ state[f"{module}.lora_A.weight"].astype(np.float64)


def test_the_global_version_is_the_svd_of_the_exact_weighted_mean_and_each_rank_gets_its_best_share():
    strategy = flexlora()
    devices, weights = [device(1, 1), device(2, 2), device(3, 4)], [5, 3, 2]
    aggregator = strategy.new_aggregator(scaling=2.0)
    for state, weight in zip(devices, weights):
        aggregator.add(strategy.split(state)[0], weight)
    new_global = aggregator.result(None)
    for module in MODULES:
        mean = sum(w * product(s, module) for s, w in zip(devices, weights)) / sum(weights)
        assert new_global[f"{module}.lora_A.weight"].shape == (MAX_RANK, IN)
        assert new_global[f"{module}.lora_B.weight"].shape == (OUT, MAX_RANK)
        u, singular, vt = np.linalg.svd(mean)
        for rank, state in ((1, devices[0]), (2, devices[1]), (4, devices[2])):
            absorbed = strategy.absorb(state, new_global)
            assert absorbed[f"{module}.lora_A.weight"].shape == (rank, IN)  # its own rank back
            best = (u[:, :rank] * singular[:rank]) @ vt[:rank]  # Eckart-Young: the best rank-r approximation
            np.testing.assert_allclose(product(absorbed, module), best, atol=1e-5)
        # Balanced factors: the singular values split evenly between B and A.
        a, b = new_global[f"{module}.lora_A.weight"], new_global[f"{module}.lora_B.weight"]
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=0), rtol=1e-4)


def test_merge_and_state_round_trip_give_the_same_result():
    strategy = flexlora()
    whole, left, right = (strategy.new_aggregator(1.0) for _ in range(3))
    for seed, rank in ((1, 1), (2, 3), (3, 4)):
        whole.add(device(seed, rank), seed)
        (left if seed < 3 else right).add(device(seed, rank), seed)
    left = strategy.aggregator_from_state(left.to_state())
    left.merge(right)
    assert left.count == 3 and left.total_weight == whole.total_weight
    for key, value in whole.result(None).items():
        np.testing.assert_allclose(left.result(None)[key], value, atol=1e-6)


def test_updates_a_device_could_not_have_sent_are_refused_whole():
    strategy = flexlora()
    aggregator = strategy.new_aggregator(1.0)
    aggregator.add(device(1, 2), 1)
    mixed = {**device(2, 2), f"{MODULES[1]}.lora_A.weight": np.ones((3, IN), np.float32),
             f"{MODULES[1]}.lora_B.weight": np.ones((OUT, 3), np.float32)}
    for bad, message in [(device(2, 5), "rank 5, above the federation's rank 4"),
                         (mixed, "mixes ranks"),
                         ({f"{MODULES[0]}.lora_A.weight": device(2, 2)[f"{MODULES[0]}.lora_A.weight"]}, "no lora_B"),
                         ({**device(2, 2), f"{MODULES[0]}.lora_B.bias": np.ones(OUT, np.float32)}, "bias")]:
        with pytest.raises(AggregationError, match=message):
            aggregator.add(bad, 1)
    assert aggregator.count == 1
    assert "above the federation's rank" in strategy.update_problem({f"{MODULES[0]}.lora_A.weight": (5, IN)})


def test_the_pinned_layout_leaves_the_rank_out_and_the_global_is_checked_at_the_device_rank():
    strategy = flexlora()
    assert strategy.layout_spec(device(1, 1)) == strategy.layout_spec(device(2, 4))
    assert strategy.layout_spec(device(1, 1))[f"{MODULES[0]}.lora_B.weight"] == ((OUT, 0), "float32")
    new_global = strategy.new_aggregator(1.0)
    new_global.add(device(1, 2), 1)
    published = new_global.result(None)
    del published[f"{MODULES[1]}.lora_A.weight"]
    with pytest.raises(TensorMismatchError, match="lacks tensor"):
        strategy.absorb(device(3, 2), published)
    # What the hub measures a device's update against: its own rank of the global version.
    start = strategy.starting_point(new_global.result(None), {k: v.shape for k, v in device(3, 1).items()})
    assert start[f"{MODULES[0]}.lora_A.weight"].shape == (1, IN)


def test_the_rank_is_the_federations():
    assert flexlora().options() == {"max_rank": MAX_RANK}
    with pytest.raises(UsageError, match="max_rank=8 differs from the LoRA rank r=4"):
        build_strategy("flexlora", {"max_rank": 8}, LoraSettings(r=MAX_RANK))
    with pytest.raises(ValueError, match="build_strategy"):
        get_strategy("flexlora").new_aggregator(1.0)
