"""Strategies that share part of a tensor (rank split), strategy options, and the layout hash.

The rule under test: what leaves a device is exactly the shared rank components, the hub
and the aggregator refuse anything else, and ``join`` puts a split back together exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedvlm.shared.aggregation import AggregationError
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.strategies import RankSplit, build_strategy, get_strategy, option_names
from fedvlm.shared.tensor_codec import TensorMismatchError
from fedvlm.shared.usage_error import UsageError
from tests.shared.test_strategies import MODULES, PERSONAL_HEAD, make_adapter

RANK = 4


def rank_split(shared_rank: int = 1) -> RankSplit:
    return build_strategy("rank-split", {"shared_rank": shared_rank}, LoraSettings(r=RANK, alpha=8))


def test_build_strategy_resolves_layout_dependent_defaults_and_checks_them():
    assert build_strategy("rank-split", {}, LoraSettings(r=8)).options() == {"shared_rank": 4}
    assert build_strategy("rank-split", None, LoraSettings(r=3)).options() == {"shared_rank": 1}
    for bad, message in [(8, "below the LoRA rank r=8"), (0, "at least 1"), ("two", "whole number")]:
        with pytest.raises(UsageError, match=message):
            build_strategy("rank-split", {"shared_rank": bad}, LoraSettings(r=8))
    with pytest.raises(UsageError, match="needs LoRA rank r >= 2"):
        build_strategy("rank-split", {}, LoraSettings(r=1))
    with pytest.raises(UsageError, match="strategy 'rank-split' has no option 'rank'; it takes shared_rank"):
        get_strategy("rank-split", rank=2)
    with pytest.raises(UsageError, match="'fedsa' has no option 'refit_steps'; it takes none"):
        get_strategy("fedsa", refit_steps=1)
    assert option_names("plora") == ("refit_steps", "personal_lr_scale", "shared_lr_scale")
    with pytest.raises(UsageError, match="refit_steps must be a whole number >= 0"):
        get_strategy("plora", refit_steps=-1)
    with pytest.raises(UsageError, match="personal_lr_scale must be a number > 0"):
        get_strategy("plora", personal_lr_scale=0)
    with pytest.raises(UsageError, match="shared_lr_scale must be a number > 0"):
        get_strategy("plora", shared_lr_scale=-1)
    # The paper's pLoRA announces what it did before shared_lr_scale existed (older devices join);
    # a set scale is announced, and a device rebuilds the same strategy from the announcement.
    assert get_strategy("plora").options() == {"refit_steps": 0, "personal_lr_scale": 1.0}
    faster_b = get_strategy("plora", shared_lr_scale=2)
    assert faster_b.options()["shared_lr_scale"] == 2.0
    assert build_strategy("plora", faster_b.options(), LoraSettings(r=8)).shared_lr_scale == 2.0


def test_layout_hash_covers_what_travels_and_nothing_else():
    lora = LoraSettings(r=RANK, alpha=8)
    # Strategies without layout options keep the LoRA settings' own hash (old federations still match).
    assert get_strategy("plora").layout_hash(lora) == lora.config_hash()
    assert get_strategy("plora", refit_steps=2).layout_hash(lora) == lora.config_hash()  # local work only
    hashes = {rank_split(k).layout_hash(lora) for k in (1, 2, 3)}
    assert len(hashes) == 3 and lora.config_hash() not in hashes


@pytest.mark.parametrize("shared_rank", [1, 3])
def test_rank_split_sends_the_leading_components_and_join_undoes_the_split(shared_rank):
    adapter = make_adapter(0, rank=RANK)
    shared, personal = rank_split(shared_rank).split(adapter)
    for module in MODULES:
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        np.testing.assert_array_equal(shared[a], adapter[a][:shared_rank])
        np.testing.assert_array_equal(shared[b], adapter[b][:, :shared_rank])
        np.testing.assert_array_equal(personal[a], adapter[a][shared_rank:])
        np.testing.assert_array_equal(personal[b], adapter[b][:, shared_rank:])
        assert shared[a].flags.c_contiguous and shared[b].flags.c_contiguous  # they are encoded as they are
    assert PERSONAL_HEAD in personal and PERSONAL_HEAD not in shared
    joined = rank_split(shared_rank).join(shared, personal)
    assert joined.keys() == adapter.keys()
    assert all(np.array_equal(joined[key], adapter[key]) for key in adapter)
    assert joined[PERSONAL_HEAD] is adapter[PERSONAL_HEAD]
    # B A is the sum of the shared and the personal adapters.
    a, b = f"{MODULES[0]}.lora_A.weight", f"{MODULES[0]}.lora_B.weight"
    np.testing.assert_allclose(adapter[b] @ adapter[a], shared[b] @ shared[a] + personal[b] @ personal[a], rtol=1e-5)


def test_rank_split_absorb_replaces_the_shared_components_only():
    strategy = rank_split(2)
    local = make_adapter(0, rank=RANK)
    aggregator = strategy.new_aggregator(scaling=2.0)
    for seed in (1, 2):
        aggregator.add(strategy.split(make_adapter(seed, rank=RANK))[0], weight=seed)
    new_global = aggregator.result(None)
    new_state = strategy.absorb(local, new_global)
    shared, personal = strategy.split(new_state)
    _, personal_before = strategy.split(local)
    for key in new_global:
        np.testing.assert_array_equal(shared[key], new_global[key])
    for key in personal_before:
        np.testing.assert_array_equal(personal[key], personal_before[key])
    with pytest.raises(TensorMismatchError, match="has shape"):  # a global at another split
        strategy.absorb(local, rank_split(1).split(local)[0])


def test_the_hub_and_the_aggregator_refuse_personal_components():
    strategy = rank_split(1)
    adapter = make_adapter(0, rank=RANK)
    shared, personal = strategy.split(adapter)
    assert strategy.update_problem({key: value.shape for key, value in shared.items()}) is None
    whole = {f"{MODULES[0]}.lora_A.weight": adapter[f"{MODULES[0]}.lora_A.weight"]}  # all 4 components
    assert "sends exactly the first 1 rank components" in strategy.update_problem({k: v.shape for k, v in whole.items()})
    bias = {f"{MODULES[0]}.lora_B.bias": np.zeros(6, np.float32)}
    assert "lora_B bias" in strategy.update_problem({k: v.shape for k, v in bias.items()})
    assert "not a LoRA factor" in strategy.update_problem({PERSONAL_HEAD: (3, 6)})
    aggregator = strategy.new_aggregator(scaling=1.0)
    with pytest.raises(AggregationError, match="first 1 rank components"):
        aggregator.add({**shared, **whole}, weight=1)
    assert aggregator.count == 0
    aggregator.add(shared, weight=1)
    restored = strategy.aggregator_from_state(aggregator.to_state())
    assert restored.count == 1 and all(np.array_equal(v, shared[k]) for k, v in restored.result(None).items())


def test_a_lora_b_bias_travels_only_with_all_of_b():
    adapter = {**make_adapter(0, rank=RANK, head=False), f"{MODULES[0]}.lora_B.bias": np.ones(6, np.float32)}
    assert f"{MODULES[0]}.lora_B.bias" in get_strategy("plora").split(adapter)[0]
    shared, personal = rank_split(2).split(adapter)
    assert f"{MODULES[0]}.lora_B.bias" in personal and f"{MODULES[0]}.lora_B.bias" not in shared


def test_vision_shared_splits_by_model_part_and_needs_the_vision_side_adapted():
    vision = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    projector = "base_model.model.model.multi_modal_projector.linear_1"
    adapter = {**make_adapter(0, rank=RANK), f"{vision}.lora_A.weight": np.ones((RANK, 8), np.float32),
               f"{vision}.lora_B.weight": np.ones((6, RANK), np.float32),
               f"{projector}.lora_A.weight": np.ones((RANK, 8), np.float32),
               f"{projector}.lora_B.weight": np.ones((6, RANK), np.float32)}
    lora = LoraSettings(r=RANK, parts=("language", "vision", "projector"))
    shared, personal = build_strategy("vision-shared", {}, lora).split(adapter)
    assert set(shared) == {f"{m}.lora_{f}.weight" for m in (vision, projector) for f in "AB"}
    assert set(personal) == set(adapter) - set(shared)  # every language-model factor, and the head
    only_projector = build_strategy("vision-shared", {"shared_parts": "projector"}, lora)
    assert set(only_projector.split(adapter)[0]) == {f"{projector}.lora_A.weight", f"{projector}.lora_B.weight"}
    language_factor = f"{MODULES[0]}.lora_B.weight"
    assert "keeps on the device" in only_projector.update_problem({language_factor: (6, RANK)})
    assert only_projector.layout_hash(lora) != build_strategy("vision-shared", {}, lora).layout_hash(lora)
    with pytest.raises(UsageError, match="adapt only the language: adapt the vision side too"):
        build_strategy("vision-shared", {}, LoraSettings(r=RANK))
    with pytest.raises(UsageError, match="shared_parts must name some of vision, projector"):
        get_strategy("vision-shared", shared_parts=["language"])
    # FedSA's split on the language side too: its A travels, its B (the clients' answers) stays.
    with_language_a = build_strategy("vision-shared", {"language_factors": "A"}, lora)
    shared_a = set(with_language_a.split(adapter)[0])
    assert shared_a == set(shared) | {k for k in adapter if k.endswith("lora_A.weight") and ".language_model." in k}
    assert any(".language_model." in k for k in shared_a - set(shared))
    assert with_language_a.layout_hash(lora) != build_strategy("vision-shared", {}, lora).layout_hash(lora)
    with pytest.raises(UsageError, match="language_factors must be A or empty"):
        get_strategy("vision-shared", language_factors="B")
