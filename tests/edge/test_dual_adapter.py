"""FedDPA on a device: FedDPA-T's training in turn, the personal reference, per-input weights."""

from __future__ import annotations

import numpy as np
import torch

from fedvlm.edge.dual_adapter import REFERENCE_KEY
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.training import TrainingConfig, train
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.lora_keys import rank_axis
from fedvlm.shared.strategies import build_strategy

LORA = LoraSettings(r=4, alpha=8)
QUICK = TrainingConfig(steps=2, batch_size=4, learning_rate=1e-2, progress=False)


def _components(state, part):
    """The global (leading 2) or personal (last 2) rank components of every factor."""
    picked = {}
    for key, value in state.items():
        axis = rank_axis(key)
        if axis is not None:
            picked[key] = np.take(value, range(0, 2) if part == "global" else range(2, 4), axis=axis)
    return picked


def test_training_in_turn_reference_and_instance_weights(tiny_model_dir, tiny_federation):
    model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="feddpa", quantization="none")
    rng = np.random.default_rng(0)  # B at zero would give A no gradient
    model.load_adapter_state({k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.adapter_state().items()})
    own, other = tiny_federation.clients[0], tiny_federation.clients[1]
    encoded = model.encoded(own.train)

    before = model.adapter_state()
    with model.mixing._frozen("personal"):  # FedDPA-T's first phase: the global adapter alone
        train(model.model, model.processor, encoded, QUICK)
    after = model.adapter_state()
    assert all(np.array_equal(v, _components(before, "personal")[k]) for k, v in _components(after, "personal").items())
    assert any(not np.array_equal(v, _components(before, "global")[k]) for k, v in _components(after, "global").items())

    metrics = model.train(own.train, TrainingConfig(steps=3, batch_size=4, learning_rate=1e-2, progress=False))
    assert metrics.steps == 6  # 3 on the global adapter, then 3 on the personal one
    # The reference is personal: it is kept with the personal tensors and never travels.
    assert REFERENCE_KEY in model.personal_factors() and REFERENCE_KEY not in model.shared_update()
    assert all(value.shape[rank_axis(key)] == 2 for key, value in model.shared_update().items())  # the global rank
    model.evaluate(own.test[:4])
    own_weights = model.mixing.last_weights
    model.evaluate(other.test[:4])
    assert own_weights.shape == (4,) and not torch.allclose(own_weights, model.mixing.last_weights)
    assert bool((own_weights <= 0.5 + 1e-6).all())  # at most max_personal_weight

    # The reference survives a state swap (the simulator's clients, a device's restart).
    state = model.adapter_state()
    model.reset_adapters()
    assert model.mixing.reference is None
    model.load_adapter_state(state)
    np.testing.assert_array_equal(model.mixing.reference.numpy(), state[REFERENCE_KEY])


def test_each_adapter_trains_for_the_whole_round(tiny_model_dir, tiny_federation):
    """FedDPA-T trains the global adapter for the round's local steps, then the personal one for
    as many (the paper's clients train each for the local epochs). Splitting the round's steps
    between the two left each adapter half of them, and a one-step round none for the personal one."""
    model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="feddpa", quantization="none")
    model.reset_adapters()  # the federation's initialisation: every B at zero
    metrics = model.train(tiny_federation.clients[0].train,
                          TrainingConfig(steps=1, batch_size=4, learning_rate=1e-2, progress=False))
    assert metrics.steps == 2
    state = model.adapter_state()
    b_factors = [key for key in state if key.endswith("lora_B.weight")]
    for part in ("global", "personal"):
        moved = _components({key: state[key] for key in b_factors}, part)
        assert any(np.abs(value).max() > 0 for value in moved.values()), f"the {part} adapter did not train"


def test_global_adapter_trains_alone(tiny_model_dir, tiny_federation):
    """The global adapter trains as plain federated LoRA, the personal one off (the paper's
    clients; ``global_phase_personal_weight`` 0): what it learns does not depend on the personal
    adapter. Mixed with it at 0.5, it learnt only to be half of a pair (alone it scored 0.27 on
    few-shot-codes, where trained alone it scores 0.56)."""
    def global_after_a_round(strategy, personal_scale):
        model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy=strategy, quantization="none")
        rng = np.random.default_rng(0)
        state = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.adapter_state().items()}
        for key, value in _components(state, "personal").items():  # scale the personal components
            index = [slice(None)] * value.ndim
            index[rank_axis(key)] = slice(2, 4)
            state[key][tuple(index)] *= personal_scale
        model.load_adapter_state(state)
        model.train(tiny_federation.clients[0].train, TrainingConfig(steps=2, batch_size=4, learning_rate=1e-2,
                                                                     progress=False))
        return _components(model.adapter_state(), "global")

    # The schedule before (both mixed at 0.5 in both phases) stays reachable as an option.
    for options, independent in (({}, True), ({"global_phase_personal_weight": 0.5}, False)):
        strategy = build_strategy("feddpa", options, LORA)
        with_personal, without = global_after_a_round(strategy, 1.0), global_after_a_round(strategy, 0.0)
        same = all(np.allclose(with_personal[k], without[k], atol=1e-6) for k in with_personal)
        assert same == independent, options


def test_relative_weighting(tiny_model_dir, tiny_federation):
    """``weighting=relative``: the cosine over the device's own typical cosine, clipped to [0, 1],
    so the weights are at least the paper's (whose cosines are below 1 even for the device's own
    data) and within [0, max_personal_weight]."""
    own = tiny_federation.clients[0]
    rng = np.random.default_rng(0)
    weights = {}
    for weighting in ("cosine", "relative"):
        model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, quantization="none",
                                            strategy=build_strategy("feddpa", {"weighting": weighting}, LORA))
        if not weights:
            state = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.adapter_state().items()}
        model.load_adapter_state(state)
        model.mixing.refresh_reference(model.encoded(own.train), model.processor.tokenizer.pad_token_id)
        model.evaluate(own.test[:6])
        weights[weighting] = model.mixing.last_weights
    assert bool((weights["relative"] >= weights["cosine"] - 1e-6).all())
    assert bool((weights["relative"] >= 0).all()) and bool((weights["relative"] <= 0.5 + 1e-6).all())
    assert not torch.allclose(weights["relative"], weights["cosine"])


def test_a_late_joiner_gets_a_reference_and_training_never_weighs_per_input(tiny_model_dir, tiny_federation):
    """A device that joins late trains only its personal adapter (``train_personal``): it then has
    a reference and is weighed per input like the members, not at the fixed training weight.
    While training, every pass weighs at the training weight, also one made in eval mode (DPO
    scores its reference so): the policy and its reference are the same mixture."""
    own = tiny_federation.clients[0]
    model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="feddpa", quantization="none")
    rng = np.random.default_rng(0)
    model.load_adapter_state({k: rng.normal(0, 0.1, v.shape).astype(np.float32)
                              for k, v in model.adapter_state().items() if k != REFERENCE_KEY})  # fmt: skip
    assert model.mixing.reference is None
    model.train_personal(model.encoded(own.train), QUICK)
    assert model.mixing.reference is not None
    model.evaluate(own.test[:2])
    assert model.mixing._row_weights is not None  # per input
    with model.mixing.fixed_weights():
        model.evaluate(own.test[:2])
        assert model.mixing._row_weights is None  # the training weight
