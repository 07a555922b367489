import subprocess
import sys

import numpy as np
import pytest

from fedvlm.shared.aggregation import AggregationError
from fedvlm.shared.strategies import STRATEGY_NAMES, base_delta_key, get_strategy
from fedvlm.shared.tensor_codec import TensorMismatchError
from fedvlm.shared.usage_error import UsageError

PREFIX = "base_model.model.model.language_model.layers"
MODULES = [f"{PREFIX}.{layer}.self_attn.{proj}" for layer in range(2) for proj in ("q_proj", "v_proj")]
PERSONAL_HEAD = "base_model.model.lm_head.modules_to_save.weight"


def make_adapter(seed: int, rank: int = 4, width: int = 8, out: int = 6, head: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for module in MODULES:
        state[f"{module}.lora_A.weight"] = rng.standard_normal((rank, width)).astype(np.float32)
        state[f"{module}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32)
    if head:
        state[PERSONAL_HEAD] = rng.standard_normal((3, out)).astype(np.float32)
    return state


@pytest.fixture
def adapter() -> dict[str, np.ndarray]:
    return make_adapter(0)


A_KEYS = {f"{module}.lora_A.weight" for module in MODULES}
B_KEYS = {f"{module}.lora_B.weight" for module in MODULES}

EXPECTED_SHARED = {
    "plora": B_KEYS,
    "fedit": A_KEYS | B_KEYS,
    "ffa": B_KEYS,
    "fedsa": A_KEYS,
    "fedex": A_KEYS | B_KEYS,
    "local": set(),
}


# Strategies that share parts of tensors or whose devices differ in rank (test_strategy_slices.py,
# test_flexlora.py).
SLICING = {"rank-split", "feddpa", "flexlora", "vision-shared"}


def test_registry_lists_every_strategy_and_refuses_unknown_names():
    assert set(STRATEGY_NAMES) == set(EXPECTED_SHARED) | SLICING
    for name in STRATEGY_NAMES:
        assert get_strategy(name).name == name
    # A UsageError (a ValueError): the name comes from a person, so command lines print one line.
    with pytest.raises(UsageError, match="unknown strategy 'fedavg'.*plora.*local"):
        get_strategy("fedavg")


def test_shared_and_frozen_factors():
    assert get_strategy("plora").shared_factors == frozenset({"B"})
    assert get_strategy("ffa").shared_factors == frozenset({"B"})
    assert get_strategy("fedit").shared_factors == frozenset({"A", "B"})
    assert get_strategy("fedex").shared_factors == frozenset({"A", "B"})
    assert get_strategy("fedsa").shared_factors == frozenset({"A"})
    assert get_strategy("local").shared_factors == frozenset()
    assert get_strategy("ffa").frozen_factors == frozenset({"A"})
    for name in ("plora", "fedit", "fedsa", "fedex", "local"):
        assert get_strategy(name).frozen_factors == frozenset(), name


@pytest.mark.parametrize("name", sorted(EXPECTED_SHARED))
def test_split_is_an_exact_partition(name, adapter):
    shared, personal = get_strategy(name).split(adapter)
    assert set(shared) == EXPECTED_SHARED[name]
    assert set(personal) == set(adapter) - EXPECTED_SHARED[name]
    assert PERSONAL_HEAD in personal  # not a LoRA factor: never leaves the device
    for key in adapter:
        assert (shared | personal)[key] is adapter[key]


def global_for(name: str, local: dict) -> dict:
    """A plausible global state: the mean over three clients, built the way the hub does."""
    strategy = get_strategy(name)
    aggregator = strategy.new_aggregator(scaling=2.0)
    for seed in (1, 2, 3):
        aggregator.add(strategy.split(make_adapter(seed))[0], weight=seed * 10)
    return aggregator.result(previous_global=None)


@pytest.mark.parametrize("name", ["plora", "fedit", "ffa", "fedsa", "fedex"])
def test_absorb_replaces_shared_and_never_touches_personal(name, adapter):
    strategy = get_strategy(name)
    before = {key: value.copy() for key, value in adapter.items()}
    new_global = global_for(name, adapter)
    new_state = strategy.absorb(adapter, new_global)

    shared, personal = strategy.split(adapter)
    for key in personal:
        assert new_state[key] is adapter[key]
    for key in shared:
        np.testing.assert_array_equal(new_state[key], new_global[key])
        assert new_state[key] is not new_global[key]  # a copy: the caller's global is not aliased
        assert not np.array_equal(new_state[key], adapter[key])
    for key, value in before.items():  # the input state itself is not modified
        np.testing.assert_array_equal(adapter[key], value)


def test_plora_absorb_keeps_personal_a(adapter):
    new_state = get_strategy("plora").absorb(adapter, global_for("plora", adapter))
    for key in A_KEYS:
        assert new_state[key] is adapter[key]


def test_fedex_absorb_adds_the_base_deltas(adapter):
    new_global = global_for("fedex", adapter)
    new_state = get_strategy("fedex").absorb(adapter, new_global)
    for module in MODULES:
        delta = new_state[base_delta_key(module)]
        assert delta.shape == (6, 8) and delta.dtype == np.float32
        np.testing.assert_array_equal(delta, new_global[base_delta_key(module)])
    # The next round's split sends no delta, and absorb replaces the held deltas.
    shared, personal = get_strategy("fedex").split(new_state)
    assert not any(key.endswith("fedex_base_delta") for key in shared)
    newer = {key: value + 1 for key, value in new_global.items()}
    newest_state = get_strategy("fedex").absorb(new_state, newer)
    np.testing.assert_array_equal(newest_state[base_delta_key(MODULES[0])], newer[base_delta_key(MODULES[0])])
    assert len(newest_state) == len(new_state)


def test_fedex_absorb_requires_the_deltas(adapter):
    new_global = global_for("fedex", adapter)
    del new_global[base_delta_key(MODULES[1])]
    with pytest.raises(TensorMismatchError, match="fedex_base_delta"):
        get_strategy("fedex").absorb(adapter, new_global)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g, k: g.pop(k), "lacks tensor"),
        (lambda g, k: g.update({k: np.zeros((6, 5), np.float32)}), "has shape"),
        (lambda g, k: g.update({k: g[k].astype(np.float64)}), "has dtype float64"),
        (lambda g, k: g[k].__setitem__((0, 0), np.nan), "NaN"),
        (lambda g, k: g.update({k.replace("lora_B", "lora_A"): np.zeros((4, 8), np.float32)}), "unexpected tensor"),
    ],
)
def test_plora_absorb_rejects_mismatched_global_state_naming_the_tensor(change, message, adapter):
    new_global = global_for("plora", adapter)
    key = f"{MODULES[2]}.lora_B.weight"
    change(new_global, key)
    with pytest.raises(TensorMismatchError, match=message) as caught:
        get_strategy("plora").absorb(adapter, new_global)
    assert MODULES[2] in str(caught.value)


def test_ffa_global_must_not_carry_a(adapter):
    new_global = global_for("ffa", adapter)
    new_global[f"{MODULES[0]}.lora_A.weight"] = adapter[f"{MODULES[0]}.lora_A.weight"]
    with pytest.raises(TensorMismatchError, match="unexpected tensor.*lora_A"):
        get_strategy("ffa").absorb(adapter, new_global)


def test_local_shares_nothing_and_refuses_every_update(adapter):
    strategy = get_strategy("local")
    aggregator = strategy.new_aggregator(scaling=2.0)
    with pytest.raises(AggregationError, match="local"):
        aggregator.add({}, weight=1)
    with pytest.raises(AggregationError, match="local"):
        aggregator.add({f"{MODULES[0]}.lora_B.weight": np.zeros((6, 4), np.float32)}, weight=1)
    assert aggregator.count == 0 and aggregator.result(None) == {}
    new_state = strategy.absorb(adapter, {})
    assert all(new_state[key] is adapter[key] for key in adapter) and new_state.keys() == adapter.keys()
    with pytest.raises(TensorMismatchError, match="unexpected"):
        strategy.absorb(adapter, {f"{MODULES[0]}.lora_B.weight": adapter[f"{MODULES[0]}.lora_B.weight"]})


@pytest.mark.parametrize(("name", "wrong_factor"), [("plora", "A"), ("ffa", "A"), ("fedsa", "B")])
def test_mean_aggregators_refuse_factors_they_do_not_share(name, wrong_factor, adapter):
    aggregator = get_strategy(name).new_aggregator(scaling=1.0)
    with pytest.raises(AggregationError, match=f"lora_{wrong_factor}.*{name}"):
        aggregator.add(adapter, weight=1)  # the whole state, not the split
    with pytest.raises(AggregationError, match="not a LoRA factor"):
        aggregator.add({PERSONAL_HEAD: adapter[PERSONAL_HEAD]}, weight=1)
    assert aggregator.count == 0


def test_new_aggregator_checks_scaling():
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="scaling"):
            get_strategy("plora").new_aggregator(bad)


def test_shared_package_does_not_import_torch():
    """The hub runs without torch: fedvlm.shared may depend on numpy and safetensors only."""
    code = (
        "import sys, fedvlm.shared.strategies, fedvlm.shared.aggregation, fedvlm.shared.tensor_codec, "
        "fedvlm.shared.lora_keys; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert completed.stdout.strip() == "[]"


def test_feddpa_announces_its_training_schedule_always_and_its_weighting_only_when_set():
    """The global adapter's schedule changed with ``global_phase_personal_weight`` (default 0): a
    device whose SDK predates it must be refused by name, not train the old way in the same
    federation; the paper's weighting needs no new option on the wire."""
    paper = get_strategy("feddpa").options()
    assert paper["global_phase_personal_weight"] == 0.0 and "weighting" not in paper
    assert get_strategy("feddpa", weighting="relative").options()["weighting"] == "relative"
    assert get_strategy("feddpa", **paper).options() == paper  # what the hub announces builds the same strategy
