"""pLoRA on a frozen quantised base: the right modules adapted, the loss goes down."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedvlm.edge.adapters import LoraSettings, attach_lora
from fedvlm.edge.evaluation import evaluate, normalize_answer
from fedvlm.edge.model_loading import load_vlm
from fedvlm.edge.quantization import default_quantization, weight_bytes
from fedvlm.edge.training import TrainingConfig, train



@pytest.fixture
def examples(colour_examples):
    return colour_examples


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_quantised_training_lowers_the_loss(tiny_model_dir, quantization, examples):
    loaded = load_vlm(tiny_model_dir, quantization=quantization, device="cpu")
    assert loaded.quantization == quantization
    model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8))
    before = evaluate(model, loaded.processor, examples[:6])
    metrics = train(model, loaded.processor, examples, TrainingConfig(steps=25, learning_rate=1e-2, progress=False))
    after = evaluate(model, loaded.processor, examples[:6])
    assert metrics.steps == 25 and metrics.examples == 25 * 8
    assert after.loss < before.loss - 0.3
    assert metrics.loss < metrics.first_loss


def test_quantised_weights_are_smaller(tiny_model_dir):
    sizes = {q: weight_bytes(load_vlm(tiny_model_dir, quantization=q).model) for q in ("none", "int8", "nf4")}
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_lora_targets_follow_the_model_parts(tiny_model_dir):
    loaded = load_vlm(tiny_model_dir, quantization="nf4")
    model = attach_lora(loaded.model, LoraSettings(r=4, layers=("attention",)))
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert adapted, "no LoRA modules"
    assert all(".language_model.layers." in name and ".self_attn." in name for name in adapted)
    assert not any("vision_tower" in name for name in adapted)
    # 2 layers x 4 projections.
    assert len(adapted) == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    def adapted_modules(settings):
        peft_model = attach_lora(load_vlm(tiny_model_dir, quantization="none").model, settings)
        return {n.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
                for n, _ in peft_model.named_parameters() if ".lora_" in n}

    # The default: attention and MLP of the language model (2 layers x 7 projections).
    default = adapted_modules(LoraSettings(r=4))
    assert len(default) == 14 and all(".language_model." in n for n in default)
    with_projector = adapted_modules(LoraSettings(r=4, parts=("language", "projector")))
    assert with_projector - default == {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    vision = adapted_modules(LoraSettings(r=4, parts=("vision",), layers=("mlp",)))
    assert vision and all(".vision_tower." in n and ".mlp." in n for n in vision)
    explicit = adapted_modules(LoraSettings(r=4, target_modules=r".*layers\.0\.self_attn\.q_proj"))
    assert explicit == {"model.language_model.layers.0.self_attn.q_proj",
                        "model.vision_tower.encoder.layers.0.self_attn.q_proj"}


def test_frozen_factor_stays_fixed(tiny_model_dir, examples):
    loaded = load_vlm(tiny_model_dir, quantization="none")
    model = attach_lora(loaded.model, LoraSettings(r=4), frozen_factors={"A"})
    a_before = {n: p.clone() for n, p in model.named_parameters() if ".lora_A." in n}
    train(model, loaded.processor, examples, TrainingConfig(steps=3, progress=False))
    assert all(torch.equal(a_before[n], p) for n, p in model.named_parameters() if n in a_before)


def test_same_seed_same_initialisation(tiny_model_dir):
    def lora_a(seed):
        model = attach_lora(load_vlm(tiny_model_dir, quantization="none").model, LoraSettings(r=4, init_seed=seed))
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}

    first, again, other = lora_a(5), lora_a(5), lora_a(6)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def _lora_grads(model, processor, examples):
    batch = processor(images=[examples[0].image], text=["<image>what colour? red"], return_tensors="pt")
    model.train()
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_nf4_gradients_stay_correct_after_an_evaluation(tiny_model_dir, examples):
    """bitsandbytes repacks NF4 weights for a non-differentiable CPU kernel on the first
    no-grad eval forward; load_vlm must prevent it or later gradients are silently wrong."""
    loaded = load_vlm(tiny_model_dir, quantization="nf4")
    model = attach_lora(loaded.model, LoraSettings(r=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)  # B = 0 would hide wrong input gradients
    before = _lora_grads(model, loaded.processor, examples)
    evaluate(model, loaded.processor, examples[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        after = _lora_grads(model, loaded.processor, examples)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-5), name


def test_default_quantization_per_device():
    assert default_quantization(torch.device("cuda"), 10_000) == "nf4"
    assert default_quantization(torch.device("cpu"), 10_000) == "none"
    assert default_quantization(torch.device("cpu"), 1 << 50) == "nf4"


def test_normalize_answer():
    assert normalize_answer("  The Red!  ") == "red"
    assert normalize_answer("a big  Circle.") == "big circle"


def test_every_device_gets_the_same_initial_factors_even_from_threads(tiny_model_dir):
    """Factors come from the federation's seed, not torch's process-wide RNG: devices
    initialised at once in threads, while another thread draws random numbers, all match a
    device initialised alone (A uniform in ±1/√in_features, B zero, as PEFT's default)."""
    import copy
    import math
    import threading

    import numpy as np

    from fedvlm.edge.adapters import adapter_state
    from fedvlm.shared.lora_keys import factor_of

    base = load_vlm(tiny_model_dir, quantization="none").model
    settings = LoraSettings(r=4, alpha=8, init_seed=3)
    alone = adapter_state(attach_lora(copy.deepcopy(base), settings))
    assert all(not value.any() for name, value in alone.items() if factor_of(name) == "B")
    for name, value in alone.items():
        if factor_of(name) == "A":
            assert value.any() and np.abs(value).max() <= 1 / math.sqrt(value.shape[1])
    assert any(not np.array_equal(alone[k], v) for k, v in
               adapter_state(attach_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8, init_seed=4))).items())

    copies = [copy.deepcopy(base) for _ in range(4)]
    results: list[dict] = [{} for _ in copies]
    start, stop = threading.Barrier(len(copies) + 1), threading.Event()

    def initialise(index: int) -> None:
        start.wait()
        results[index] = adapter_state(attach_lora(copies[index], settings))

    def draw_random_numbers() -> None:  # another device training, say
        start.wait()
        while not stop.is_set():
            torch.rand(1000)

    threads = [threading.Thread(target=initialise, args=(i,)) for i in range(len(copies))]
    noise = threading.Thread(target=draw_random_numbers)
    for thread in (*threads, noise):
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stop.set()
    noise.join(timeout=10)
    for result in results:
        assert result.keys() == alone.keys()
        assert all(np.array_equal(result[k], alone[k]) for k in alone)
