import numpy as np
import pytest

from fedvlm.shared.aggregation import AggregationError, StreamingWeightedMean
from fedvlm.shared.strategies import base_delta_key, get_strategy

SHAPES = {"layer.0.lora_B.weight": (6, 4), "layer.1.lora_B.weight": (5, 3), "bias": (7,)}
MODULES = ["m.0.q_proj", "m.0.v_proj", "m.1.q_proj"]
SCALING = 2.0


def random_update(rng: np.random.Generator, shapes=SHAPES) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def random_factors(rng: np.random.Generator, rank: int = 3, width: int = 5, out: int = 4) -> dict[str, np.ndarray]:
    update = {}
    for module in MODULES:
        update[f"{module}.lora_A.weight"] = rng.standard_normal((rank, width)).astype(np.float32)
        update[f"{module}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32)
    return update


def batch_mean(updates, weights) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {name: sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights)) / total for name in updates[0]}


def assert_same_state(state, expected):
    assert state["count"] == expected["count"] and state["total_weight"] == expected["total_weight"]
    assert state["sums"].keys() == expected["sums"].keys()
    for name in state["sums"]:
        np.testing.assert_array_equal(state["sums"][name], expected["sums"][name])


def test_streaming_mean_equals_batch_formula_with_random_weights():
    rng = np.random.default_rng(0)
    updates = [random_update(rng) for _ in range(7)]
    weights = [float(w) for w in rng.integers(1, 500, size=7)]
    weights[2] = 0.25  # non-integer weights work too
    mean = StreamingWeightedMean()
    for update, weight in zip(updates, weights):
        mean.add(update, weight)
    assert mean.count == 7 and mean.total_weight == pytest.approx(sum(weights))
    expected = batch_mean(updates, weights)
    result = mean.result()
    for name in SHAPES:
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], expected[name], rtol=1e-5, atol=1e-6)


def test_float16_and_float64_updates_are_averaged_in_float32():
    rng = np.random.default_rng(1)
    updates = [random_update(rng) for _ in range(2)]
    mixed = [
        {k: v.astype(np.float16) for k, v in updates[0].items()},
        {k: v.astype(np.float64) for k, v in updates[1].items()},
    ]
    mean = StreamingWeightedMean()
    for update in mixed:
        mean.add(update, 3)
    expected = batch_mean(mixed, [3, 3])
    for name, value in mean.result().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_merge_of_partial_sums_equals_one_sum():
    rng = np.random.default_rng(2)
    updates = [random_update(rng) for _ in range(9)]
    weights = rng.uniform(1, 100, size=9)
    whole, parts = StreamingWeightedMean(), [StreamingWeightedMean() for _ in range(3)]
    for index, (update, weight) in enumerate(zip(updates, weights)):
        whole.add(update, weight)
        parts[index % 3].add(update, weight)
    combined = StreamingWeightedMean()  # an empty coordinator adopts the first partial sum
    second_state = parts[1].to_state()
    for part in parts:
        combined.merge(part)
    combined.merge(StreamingWeightedMean())  # merging nothing changes nothing
    assert_same_state(parts[1].to_state(), second_state)  # the merged-in sum is left unchanged
    assert combined.count == 9 and combined.total_weight == pytest.approx(whole.total_weight)
    for name, value in combined.result().items():
        np.testing.assert_allclose(value, whole.result()[name], rtol=1e-5, atol=1e-6)


def test_adds_continue_after_merging_into_an_empty_sum():
    rng = np.random.default_rng(13)
    first, second = random_update(rng), random_update(rng)
    worker, coordinator = StreamingWeightedMean(), StreamingWeightedMean()
    worker.add(first, 2)
    coordinator.merge(worker)
    coordinator.add(second, 6)
    expected = batch_mean([first, second], [2, 6])
    for name, value in coordinator.result().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_merge_refuses_sums_over_different_tensors():
    rng = np.random.default_rng(3)
    left, right = StreamingWeightedMean(), StreamingWeightedMean()
    left.add(random_update(rng), 1)
    right.add(random_update(rng, {**SHAPES, "bias": (8,)}), 1)
    before = left.to_state()
    with pytest.raises(AggregationError, match="'bias' has shape"):
        left.merge(right)
    assert_same_state(left.to_state(), before)


def _bad_updates(rng):
    good = random_update(rng)
    nan_last = {k: v.copy() for k, v in good.items()}
    nan_last["bias"][3] = np.nan  # the earlier tensors are fine: nothing may be added anyway
    return [
        ({k: v for k, v in good.items() if k != "bias"}, 1, "lacks tensor 'bias'"),
        ({**good, "extra": np.zeros(2, np.float32)}, 1, "'extra'"),
        ({**good, "layer.1.lora_B.weight": np.zeros((3, 5), np.float32)}, 1, "'layer.1.lora_B.weight' has shape"),
        (nan_last, 1, "'bias' contains NaN or Inf"),
        ({**good, "bias": np.full(7, 1e29, np.float32)}, 100, "'bias' has a value of magnitude"),
        ({**good, "bias": np.arange(7)}, 1, "'bias' has dtype int64"),
        ({**good, "bias": [0.0] * 7}, 1, "not a numpy array"),
        ({}, 1, "no tensors"),
        (good, 0, "positive"),
        (good, -3, "positive"),
        (good, float("nan"), "positive"),
        (good, float("inf"), "positive"),
        (good, True, "must be a number"),
        (good, "10", "must be a number"),
    ]


def test_rejected_add_leaves_the_sum_unchanged():
    rng = np.random.default_rng(4)
    mean = StreamingWeightedMean()
    mean.add(random_update(rng), 5)
    mean.add(random_update(rng), 7)
    before = mean.to_state()
    for update, weight, message in _bad_updates(rng):
        with pytest.raises(AggregationError, match=message):
            mean.add(update, weight)
        assert_same_state(mean.to_state(), before)


def test_first_add_rejected_leaves_the_aggregator_empty():
    mean = StreamingWeightedMean()
    with pytest.raises(AggregationError, match="NaN"):
        mean.add({"w": np.array([1.0, np.inf], np.float32)}, 1)
    assert mean.count == 0 and mean.shapes() == {}
    mean.add({"v": np.ones(3, np.float32)}, 2)  # the refused update did not fix the names
    np.testing.assert_array_equal(mean.result()["v"], np.ones(3, np.float32))


def test_result_needs_an_update():
    with pytest.raises(AggregationError, match="no updates"):
        StreamingWeightedMean().result()


def test_state_round_trip_resumes_the_same_sum():
    rng = np.random.default_rng(5)
    updates = [random_update(rng) for _ in range(4)]
    uninterrupted, first_half = StreamingWeightedMean(), StreamingWeightedMean()
    for index, update in enumerate(updates):
        uninterrupted.add(update, index + 1)
        if index < 2:
            first_half.add(update, index + 1)
    resumed = StreamingWeightedMean.from_state(first_half.to_state())
    for index, update in enumerate(updates[2:], start=2):
        resumed.add(update, index + 1)
    assert_same_state(resumed.to_state(), uninterrupted.to_state())
    assert StreamingWeightedMean.from_state(StreamingWeightedMean().to_state()).count == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("count"), "lacks"),
        (lambda s: s.update(count=-1), "count"),
        (lambda s: s.update(total_weight=0.0), "positive"),
        (lambda s: s["sums"].update(bias=np.zeros(7, np.float64)), "float32"),
        (lambda s: s["sums"]["bias"].__setitem__(0, np.nan), "NaN"),
        (lambda s: s.update(sums={}), "no sums"),
    ],
)
def test_from_state_refuses_inconsistent_state(change, message):
    mean = StreamingWeightedMean()
    mean.add(random_update(np.random.default_rng(6)), 2)
    state = mean.to_state()
    change(state)
    with pytest.raises(AggregationError, match=message):
        StreamingWeightedMean.from_state(state)


# ------------------------------------------------------------------ strategy aggregators


def test_strategy_aggregator_state_round_trip_and_owner_check():
    rng = np.random.default_rng(7)
    plora = get_strategy("plora")
    aggregator = plora.new_aggregator(SCALING)
    aggregator.add({k: v for k, v in random_factors(rng).items() if "lora_B" in k}, 3)
    restored = plora.aggregator_from_state(aggregator.to_state())
    assert restored.count == 1
    for name, value in restored.result(None).items():
        np.testing.assert_array_equal(value, aggregator.result(None)[name])
    with pytest.raises(AggregationError, match="belongs to strategy 'plora'"):
        get_strategy("fedsa").aggregator_from_state(aggregator.to_state())
    with pytest.raises(AggregationError, match="'fedsa'.*'plora'"):
        aggregator.merge(get_strategy("fedsa").new_aggregator(SCALING))


def fedex_round(clients, weights, previous_global, scaling=SCALING):
    aggregator = get_strategy("fedex").new_aggregator(scaling)
    for update, weight in zip(clients, weights):
        aggregator.add(update, weight)
    return aggregator.result(previous_global)


def weighted_product_mean(clients, weights, module):
    a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    total = sum(weights)
    products = (w * (c[b_key].astype(np.float64) @ c[a_key].astype(np.float64)) for c, w in zip(clients, weights))
    return sum(products) / total


def test_fedex_means_plus_delta_reproduce_the_exact_weighted_mean_of_products():
    rng = np.random.default_rng(8)
    clients = [random_factors(rng) for _ in range(5)]
    weights = [float(w) for w in rng.integers(1, 200, size=5)]
    new_global = fedex_round(clients, weights, previous_global=None)
    expected_means = batch_mean(clients, weights)
    assert set(new_global) == set(expected_means) | {base_delta_key(m) for m in MODULES}
    for module in MODULES:
        a, b = new_global[f"{module}.lora_A.weight"], new_global[f"{module}.lora_B.weight"]
        np.testing.assert_allclose(a, expected_means[f"{module}.lora_A.weight"], rtol=1e-5, atol=1e-6)
        delta = new_global[base_delta_key(module)]
        assert delta.dtype == np.float32 and delta.shape == (4, 5)
        assert np.abs(delta).max() > 1e-2  # the residual is real: separate means are inexact
        exact = SCALING * weighted_product_mean(clients, weights, module)
        np.testing.assert_allclose(SCALING * (b @ a) + delta, exact, rtol=1e-4, atol=1e-5)


def test_fedex_delta_is_cumulative_over_rounds():
    rng = np.random.default_rng(9)
    round1 = [random_factors(rng) for _ in range(3)]
    round2 = [random_factors(rng) for _ in range(4)]
    weights1, weights2 = [10.0, 20.0, 5.0], [1.0, 2.0, 3.0, 4.0]
    global1 = fedex_round(round1, weights1, None)
    global2 = fedex_round(round2, weights2, global1)
    for module in MODULES:
        a, b = global2[f"{module}.lora_A.weight"], global2[f"{module}.lora_B.weight"]
        # Clients of round 2 trained on W0 + delta1; their averaged models are W0 + delta1 + s*mean(B_i A_i).
        expected = global1[base_delta_key(module)] + SCALING * weighted_product_mean(round2, weights2, module)
        np.testing.assert_allclose(global2[base_delta_key(module)] + SCALING * (b @ a), expected, rtol=1e-4, atol=1e-5)


def test_fedex_merge_and_state_round_trip_match_one_aggregator():
    rng = np.random.default_rng(10)
    clients = [random_factors(rng) for _ in range(6)]
    weights = [float(w) for w in rng.integers(1, 50, size=6)]
    fedex = get_strategy("fedex")
    whole = fedex.new_aggregator(SCALING)
    left, right = fedex.new_aggregator(SCALING), fedex.new_aggregator(SCALING)
    for index, (client, weight) in enumerate(zip(clients, weights)):
        whole.add(client, weight)
        (left if index < 2 else right).add(client, weight)
    left = fedex.aggregator_from_state(left.to_state())  # persisted and restored mid-round
    left.merge(right)
    previous = fedex_round(clients[:2], weights[:2], None)
    merged_result, whole_result = left.result(previous), whole.result(previous)
    assert merged_result.keys() == whole_result.keys()
    for name, value in merged_result.items():
        np.testing.assert_allclose(value, whole_result[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(AggregationError, match="scalings"):
        left.merge(fedex.new_aggregator(SCALING * 2))


def test_fedex_rejects_incomplete_or_foreign_updates_unchanged():
    rng = np.random.default_rng(11)
    aggregator = get_strategy("fedex").new_aggregator(SCALING)
    aggregator.add(random_factors(rng), 4)
    before = aggregator.to_state()
    update = random_factors(rng)
    without_b = {k: v for k, v in update.items() if k != f"{MODULES[1]}.lora_B.weight"}
    with pytest.raises(AggregationError, match="lacks tensor"):
        aggregator.add(without_b, 1)
    with pytest.raises(AggregationError, match="not a LoRA factor"):
        aggregator.add({**update, base_delta_key(MODULES[0]): np.zeros((4, 5), np.float32)}, 1)
    huge = {**update, f"{MODULES[2]}.lora_A.weight": np.full((3, 5), 1e15, np.float32)}
    with pytest.raises(AggregationError, match=r"\|B\| \* \|A\|"):
        aggregator.add({**huge, f"{MODULES[2]}.lora_B.weight": np.full((4, 3), 1e15, np.float32)}, 1)
    after = aggregator.to_state()
    assert after["count"] == before["count"]
    for name in before["sums"]:
        np.testing.assert_array_equal(after["sums"][name], before["sums"][name])

    fresh = get_strategy("fedex").new_aggregator(SCALING)
    with pytest.raises(AggregationError, match="no lora_B"):
        fresh.add(without_b, 1)
    assert fresh.count == 0


def test_fedex_result_checks_the_previous_deltas():
    rng = np.random.default_rng(12)
    aggregator = get_strategy("fedex").new_aggregator(SCALING)
    aggregator.add(random_factors(rng), 1)
    previous = {base_delta_key(MODULES[0]): np.zeros((4, 5), np.float32)}  # the other modules' deltas are missing
    with pytest.raises(AggregationError, match=r"lacks tensor .*v_proj\.fedex_base_delta"):
        aggregator.result(previous)
    without_deltas = aggregator.result({"unrelated": np.zeros(1, np.float32)})  # no deltas yet: delta_0 = 0
    key = base_delta_key(MODULES[0])
    np.testing.assert_array_equal(without_deltas[key], aggregator.result(None)[key])


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 8193, 3 * 8192 + 5, 300_000])
def test_sum_of_squares_is_the_dot_product_of_the_values_with_themselves(size):
    """Computed in blocks (so BLAS keeps it on the calling thread) it is still the sum of the
    squares: as np.dot in float64, to float32 rounding for float32; NaN and Inf come through."""
    from fedvlm.shared.aggregation import sum_of_squares

    values = np.random.default_rng(size).normal(size=size)
    assert sum_of_squares(values) == pytest.approx(float(np.dot(values, values)), rel=1e-12, abs=0.0)
    assert sum_of_squares(values.astype(np.float32).reshape(-1, 1)) == pytest.approx(float(np.dot(values, values)),
                                                                                     rel=1e-5, abs=0.0)  # fmt: skip
    if size:
        for poison in (np.nan, np.inf):
            poisoned = values.copy()
            poisoned[size // 2] = poison
            result = sum_of_squares(poisoned)
            assert np.isnan(result) if np.isnan(poison) else result == np.inf
