import pytest

from fedvlm.shared import lora_keys

PREFIX = "base_model.model.model.language_model.layers.0.self_attn"
Q_A = f"{PREFIX}.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.q_proj.lora_B.weight"
V_A = f"{PREFIX}.v_proj.lora_A.weight"
V_B = f"{PREFIX}.v_proj.lora_B.weight"
HEAD = "base_model.model.lm_head.modules_to_save.default.weight"


@pytest.mark.parametrize(
    ("key", "factor", "module"),
    [
        (Q_A, "A", f"{PREFIX}.q_proj"),
        (Q_B, "B", f"{PREFIX}.q_proj"),
        (f"{PREFIX}.q_proj.lora_A.default.weight", "A", f"{PREFIX}.q_proj"),  # live state_dict, adapter name
        (f"{PREFIX}.q_proj.lora_B.bias", "B", f"{PREFIX}.q_proj"),  # LoraConfig(lora_bias=True)
        ("base_model.model.embed_tokens.lora_embedding_A", "A", "base_model.model.embed_tokens"),
        ("base_model.model.embed_tokens.lora_embedding_B.default", "B", "base_model.model.embed_tokens"),
    ],
)
def test_factor_and_module_of_lora_keys(key, factor, module):
    assert lora_keys.factor_of(key) == factor
    assert lora_keys.module_of(key) == module


@pytest.mark.parametrize(
    "key",
    [HEAD, f"{PREFIX}.q_proj.weight", f"{PREFIX}.q_proj.lora_magnitude_vector", f"{PREFIX}.q_proj.lora_C.weight",
     f"{PREFIX}.q_proj.fedex_base_delta", "lora_A.weight"],
)
def test_other_tensors_are_not_factors(key):
    assert lora_keys.factor_of(key) is None
    with pytest.raises(ValueError, match="not a LoRA factor"):
        lora_keys.module_of(key)


def test_pair_by_module_pairs_in_first_seen_order_and_ignores_other_tensors():
    pairs = lora_keys.pair_by_module([V_B, Q_A, HEAD, Q_B, V_A, f"{PREFIX}.v_proj.lora_B.bias"])
    assert pairs == {f"{PREFIX}.v_proj": (V_A, V_B), f"{PREFIX}.q_proj": (Q_A, Q_B)}
    assert list(pairs) == [f"{PREFIX}.v_proj", f"{PREFIX}.q_proj"]


def test_pair_by_module_names_the_module_missing_a_factor():
    with pytest.raises(ValueError, match=r"v_proj.*no lora_A"):
        lora_keys.pair_by_module([Q_A, Q_B, V_B])
    with pytest.raises(ValueError, match=r"q_proj.*no lora_B"):
        lora_keys.pair_by_module([Q_A])


def test_pair_by_module_refuses_two_adapters_mixed():
    with pytest.raises(ValueError, match="two lora_A"):
        lora_keys.pair_by_module([Q_A, f"{PREFIX}.q_proj.lora_A.other.weight", Q_B])


def test_select_keeps_only_requested_factors_in_order():
    state = {Q_A: 1, Q_B: 2, HEAD: 3, V_A: 4, V_B: 5}
    assert lora_keys.select(state, {"B"}) == {Q_B: 2, V_B: 5}
    assert list(lora_keys.select(state, {"A", "B"})) == [Q_A, Q_B, V_A, V_B]
    assert lora_keys.select(state, set()) == {}
    with pytest.raises(ValueError, match="unknown LoRA factor"):
        lora_keys.select(state, {"a"})
