"""PersonalVLM: what leaves the device, what stays, and absorbing the global state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedvlm.edge.adapters import LoraSettings
from fedvlm.edge.model_loading import load_vlm
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.training import TrainingConfig
from fedvlm.shared.lora_keys import factor_of
from fedvlm.shared.tensor_codec import TensorMismatchError

LORA = LoraSettings(r=4, alpha=8, init_seed=7)
QUICK = TrainingConfig(steps=4, learning_rate=1e-2, progress=False)


def _model(model_dir, strategy="plora", quantization="nf4"):
    return PersonalVLM.from_pretrained(model_dir, lora=LORA, strategy=strategy, quantization=quantization)


EXPECTED_SHARED = {"plora": {"B"}, "ffa": {"B"}, "fedit": {"A", "B"}, "fedex": {"A", "B"}, "fedsa": {"A"}, "local": set()}


@pytest.mark.parametrize("strategy", sorted(EXPECTED_SHARED))
def test_split_shares_exactly_the_strategys_factors(tiny_model_dir, strategy):
    model = _model(tiny_model_dir, strategy, quantization="none")
    everything = model.adapter_state()
    shared, personal = model.shared_update(), model.personal_factors()
    assert {factor_of(k) for k in shared} == EXPECTED_SHARED[strategy]
    assert set(shared) | set(personal) == set(everything)
    assert not set(shared) & set(personal)


def test_apply_global_replaces_b_and_never_touches_a(tiny_model_dir, colour_examples):
    client = _model(tiny_model_dir)
    client.train(colour_examples, QUICK)
    personal_before = client.personal_factors()
    global_b = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
                for k, v in client.shared_update().items()}
    client.apply_global(global_b)
    for key, value in client.shared_update().items():
        np.testing.assert_array_equal(value, global_b[key])
    for key, value in client.personal_factors().items():
        np.testing.assert_array_equal(value, personal_before[key])


def test_mismatched_global_is_refused_and_changes_nothing(tiny_model_dir, colour_examples):
    client = _model(tiny_model_dir)
    client.train(colour_examples, QUICK)
    before = client.adapter_state()
    good = client.shared_update()
    first = sorted(good)[0]
    wrong_shape = {**good, first: np.zeros((3, 3), np.float32)}
    with pytest.raises(TensorMismatchError, match="shape"):
        client.apply_global(wrong_shape)
    missing = {k: v for k, v in good.items() if k != first}
    with pytest.raises(TensorMismatchError, match="lacks tensor"):
        client.apply_global(missing)
    wrong_dtype = {**good, first: good[first].astype(np.float64)}
    with pytest.raises(TensorMismatchError, match="dtype"):
        client.apply_global(wrong_dtype)
    not_finite = {**good, first: np.full_like(good[first], np.nan)}
    with pytest.raises(TensorMismatchError):
        client.apply_global(not_finite)
    after = client.adapter_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_peft_format_loads_with_peft_from_pretrained(tiny_model_dir, colour_examples, tmp_path):
    client = _model(tiny_model_dir, quantization="none")
    client.train(colour_examples, QUICK)
    client.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_vlm(tiny_model_dir, quantization="none").model, tmp_path / "adapter")
    batch = client.processor(images=[colour_examples[0].image], text=["<image>what colour is it?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(client.model(**batch).logits, reloaded(**batch).logits, atol=1e-6)


def test_fedex_base_delta_equals_adding_it_to_the_weight(tiny_model_dir, colour_examples):
    client = _model(tiny_model_dir, "fedex", quantization="none")
    shared = client.shared_update()
    rng = np.random.default_rng(1)
    global_state = {k: v.copy() for k, v in shared.items()}
    module = sorted(k for k in shared if ".q_proj.lora_A" in k)[0].rsplit(".lora_A", 1)[0]
    layer = client.model.get_submodule(module).base_layer
    delta = rng.normal(scale=0.1, size=tuple(layer.weight.shape)).astype(np.float32)
    for key in shared:
        if factor_of(key) == "A":
            mod = key.rsplit(".lora_A", 1)[0]
            shape = tuple(client.model.get_submodule(mod).base_layer.weight.shape)
            global_state[mod + ".fedex_base_delta"] = delta if mod == module else np.zeros(shape, np.float32)
    batch = client.processor(images=[colour_examples[0].image], text=["<image>what colour is it?"], return_tensors="pt")
    client.apply_global(global_state)
    with torch.no_grad():
        with_delta = client.model(**batch).logits
        layer.weight += torch.from_numpy(delta)
        client.apply_global({**global_state, module + ".fedex_base_delta": np.zeros_like(delta)})
        with_weight = client.model(**batch).logits
    assert torch.allclose(with_delta, with_weight, atol=1e-5)
    assert module + ".fedex_base_delta" in client.adapter_state()


def test_interrupted_training_resumes_from_its_checkpoint(tiny_model_dir, colour_examples, tmp_path):
    config = TrainingConfig(steps=6, learning_rate=1e-2, progress=False)
    straight = _model(tiny_model_dir, quantization="none")
    straight.train(colour_examples, config)

    resumed = _model(tiny_model_dir, quantization="none")
    checkpoint = tmp_path / "train.ckpt"
    from fedvlm.edge import training

    original = training._save_checkpoint

    def crash_after_saving(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash after step 3")

    training._save_checkpoint = crash_after_saving
    try:
        with pytest.raises(KeyboardInterrupt):
            resumed.train(colour_examples, config, checkpoint_path=checkpoint, checkpoint_every=3)
    finally:
        training._save_checkpoint = original
    assert checkpoint.exists()
    metrics = resumed.train(colour_examples, config, checkpoint_path=checkpoint, checkpoint_every=3)
    assert metrics.steps == 3 and not checkpoint.exists()
    a, b = straight.adapter_state(), resumed.adapter_state()
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_restoring_a_saved_state_gives_back_every_trained_factor(tiny_model_dir, colour_examples, tmp_path):
    from fedvlm.edge.device_state import load_state, save_state

    trained = _model(tiny_model_dir, quantization="none")
    trained.train(colour_examples, QUICK)  # local training: no global version has replaced B
    save_state(tmp_path, trained.device_state(federation="f", client_id="c", round=0, global_version=0,
                                              global_state={}))
    fresh = _model(tiny_model_dir, quantization="none")
    fresh.restore(load_state(tmp_path))
    before, after = trained.adapter_state(), fresh.adapter_state()
    assert any(np.abs(v).max() > 0 for k, v in before.items() if factor_of(k) == "B")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_device_of_lower_rank_is_the_leading_block_of_the_federations_adapter(tiny_model_dir):
    """flexlora, r=4: a rank-2 device starts from the first 2 components of the federation's
    initialisation, at the federation's scaling, so it computes what a rank-4 adapter with
    its other components at zero computes."""
    from fedvlm.shared.lora_keys import at_rank
    from fedvlm.shared.usage_error import UsageError

    full = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="flexlora", quantization="none")
    small = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="flexlora", quantization="none", rank=2)
    assert small.rank == 2 and small.layout_hash == full.layout_hash  # one federation
    initial = at_rank(full.adapter_state(), 2)
    assert all(np.array_equal(value, initial[key]) for key, value in small.adapter_state().items())
    rng = np.random.default_rng(0)
    state = {key: rng.normal(0, 0.2, value.shape).astype(np.float32) for key, value in small.adapter_state().items()}
    small.load_adapter_state(state)
    full.load_adapter_state(at_rank(state, 4))
    name = next(name for name, module in small.model.named_modules() if name.endswith("q_proj") and
                hasattr(module, "lora_A"))  # fmt: skip
    x = torch.randn(3, dict(small.model.named_modules())[name].in_features)
    with torch.no_grad():
        torch.testing.assert_close(dict(small.model.named_modules())[name](x), dict(full.model.named_modules())[name](x))
    with pytest.raises(UsageError, match="'plora' needs every device at the federation's LoRA rank r=4, not 2"):
        PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="plora", quantization="none", rank=2)
    with pytest.raises(UsageError, match="between 1 and the federation's r=4"):
        PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, strategy="flexlora", quantization="none", rank=5)


@pytest.mark.parametrize("strategy", ["plora", "rank-split"])
def test_train_personal_holds_the_shared_part_whole_factors_or_rank_components(tiny_model_dir, colour_examples,
                                                                               strategy):
    """What a device that joins late (or refits to a new global version) trains: its personal
    part alone; under rank-split the shared components of the very same tensors stay put."""
    model = _model(tiny_model_dir, strategy, quantization="none")
    rng = np.random.default_rng(0)  # B at zero would give A no gradient
    model.load_adapter_state({k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.adapter_state().items()})
    shared, personal = model.shared_update(), model.personal_factors()
    metrics = model.train_personal(model.encoded(colour_examples), QUICK)
    assert metrics.steps == QUICK.steps
    assert all(np.array_equal(value, shared[key]) for key, value in model.shared_update().items())
    assert any(not np.array_equal(value, personal[key]) for key, value in model.personal_factors().items())
    assert all(p.requires_grad for name, p in model.model.named_parameters() if factor_of(name))  # restored


def test_plora_learning_rate_scales_apply_to_their_own_factor_only(tiny_model_dir, colour_examples):
    """pLoRA's per-factor learning rates: ``shared_lr_scale`` (LoRA+'s faster B) moves B that many
    times as far in the same step and leaves A's step as it is; ``personal_lr_scale`` the mirror.
    (AdamW's step, weight decay included, is linear in the learning rate from the same state.)"""
    from fedvlm.shared.strategies import get_strategy

    one_step = TrainingConfig(steps=1, learning_rate=1e-2, progress=False)
    rng = np.random.default_rng(0)  # B at zero would give A no gradient
    start = None
    steps = {}
    for label, options in [("paper", {}), ("B x4", {"shared_lr_scale": 4.0}), ("A x0.5", {"personal_lr_scale": 0.5})]:
        model = _model(tiny_model_dir, get_strategy("plora", **options), quantization="none")
        if start is None:
            start = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in model.adapter_state().items()}
        model.load_adapter_state(start)
        model.train(colour_examples, one_step)
        steps[label] = {k: v - start[k] for k, v in model.adapter_state().items()}
    for key, paper in steps["paper"].items():
        assert np.abs(paper).max() > 0, key
        faster_b, slower_a = steps["B x4"][key], steps["A x0.5"][key]
        if factor_of(key) == "B":
            np.testing.assert_allclose(faster_b, 4 * paper, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(slower_a, paper, rtol=1e-4, atol=1e-7)
        else:
            np.testing.assert_allclose(faster_b, paper, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(slower_a, 0.5 * paper, rtol=1e-4, atol=1e-7)
