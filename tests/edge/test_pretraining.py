"""Pre-training a tiny base: the loss falls, the result is cached by recipe and loads back."""

from __future__ import annotations

import json

from fedvlm.edge.model_loading import load_vlm
from fedvlm.edge.pretraining import PretrainingConfig, is_built, make_pretrained_tiny_model, score_card


def test_pretrained_tiny_model_is_built_once_per_recipe(tmp_path):
    config = PretrainingConfig(steps=30, batch_size=8, learning_rate=3e-3, progress=False)
    out = make_pretrained_tiny_model(tmp_path / "m", "tiny", examples=64, config=config)
    report = json.loads((out / "fedvlm_pretraining.json").read_text())
    assert report["result"]["last_loss"] < report["result"]["first_loss"]
    assert is_built(out, "tiny", examples=64, config=config)
    assert not is_built(out, "tiny", examples=64, config=PretrainingConfig(steps=31, batch_size=8,
                                                                           learning_rate=3e-3))
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    make_pretrained_tiny_model(out, "tiny", examples=64, config=config)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    loaded = load_vlm(out, quantization="none")
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_object_heads_label_the_patch_under_each_shape():
    import numpy as np

    from fedvlm.edge.vision_pretraining import attribute_batch

    images, labels = attribute_batch(np.random.default_rng(0), 12, 32, (0.1, 0.2), 0.5, patch_size=8)
    assert labels["object_shape"].shape == (12, 16)  # 4 x 4 patches
    for index in range(12):
        shapes = labels["object_shape"][index][labels["object_shape"][index] != -100]
        count = int(labels["count"][index]) + 1  # every picture's count is labelled
        assert len(shapes) == count  # one labelled patch per shape (one shape per quadrant, so never two in one)
        if count == 1:
            assert int(shapes[0]) == int(labels["shape"][index])


def test_vision_stage_then_language_stage_with_the_tower_frozen(tmp_path):
    """The two-stage recipe: the vision tower trains alone with attribute heads, then stays as it is
    while the projector and language model learn; the report scores every kind, novel ones too."""
    import torch

    from fedvlm.edge.data import QUESTION_KINDS
    from fedvlm.edge.pretraining import pretrain
    from fedvlm.edge.tiny_model import build_tiny_vlm
    from fedvlm.edge.vision_pretraining import VisionPretrainingConfig, pretrain_vision, vision_tower_of
    from fedvlm.edge.data import all_words, pretraining_records

    model, processor = build_tiny_vlm("tiny", extra_words=all_words())
    tower = vision_tower_of(model)
    before = {name: value.clone() for name, value in tower.state_dict().items()}
    heads = pretrain_vision(model, processor, VisionPretrainingConfig(steps=25, batch_size=8, object_heads=True,
                                                                      fused_optimizer=True), progress=False)
    assert set(heads) == {"colour", "shape", "count", "position", "object_colour", "object_shape"}
    assert all(0 <= a <= 1 for a in heads.values())
    trained = {name: value.clone() for name, value in tower.state_dict().items()}
    assert any(not torch.equal(before[name], trained[name]) for name in before)
    losses = pretrain(model, processor, pretraining_records(32, image_size=32),
                      config=PretrainingConfig(steps=4, batch_size=4, progress=False, train_vision=False,
                                               warmup_steps=2, labelled_logits_only=True, fused_optimizer=True))
    assert len(losses) == 4
    assert all(torch.equal(trained[name], value) for name, value in tower.state_dict().items())

    vision = VisionPretrainingConfig(steps=3, batch_size=4)
    config = PretrainingConfig(steps=3, batch_size=4, progress=False, train_vision=False)
    out = make_pretrained_tiny_model(tmp_path / "m", "tiny", examples=16, config=config, vision=vision,
                                     card_examples_per_kind=4)
    report = json.loads((out / "fedvlm_pretraining.json").read_text())
    assert report["vision_pretraining"]["steps"] == 3
    assert report["result"]["card_examples_per_kind"] == 4
    for phrasing in ("client_questions", "pretraining_questions"):
        assert set(report["result"]["accuracy"][phrasing]) == set(QUESTION_KINDS)
    assert is_built(out, "tiny", examples=16, config=config, vision=vision)
    assert not is_built(out, "tiny", examples=16, config=config)  # the vision stage is part of the recipe

    # A cached base's card is re-measured at another size without a rebuild; the old card is kept.
    weights = (out / "model.safetensors").read_bytes()
    card = score_card(out, examples_per_kind=6)
    assert card["card_examples_per_kind"] == 6 and card["earlier_cards"]["4"] == report["result"]["accuracy"]
    assert json.loads((out / "fedvlm_pretraining.json").read_text())["result"] == card
    assert (out / "model.safetensors").read_bytes() == weights
    assert is_built(out, "tiny", examples=16, config=config, vision=vision)


def test_the_same_recipe_builds_bit_identical_weights_whatever_the_callers_threads(tmp_path):
    """Builds of one recipe used to differ with the caller's torch thread count (a reduction over
    2 threads sums in another order than over 1), and the differences grew over the build's steps
    into bases that read shape at 0.41 or 0.83. The build now pins its own threads and seeds."""
    import torch
    from safetensors.torch import load_file

    config = PretrainingConfig(steps=12, batch_size=8, learning_rate=3e-3, progress=False)
    threads, builds = torch.get_num_threads(), []
    try:
        for index, caller_threads in enumerate((2, 1)):
            torch.set_num_threads(caller_threads)
            torch.manual_seed(100 + index)  # whatever the caller drew before must not matter either
            out = make_pretrained_tiny_model(tmp_path / f"m{index}", "small", examples=32, config=config)
            builds.append(load_file(out / "model.safetensors"))
            assert torch.get_num_threads() == caller_threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert builds[0].keys() == builds[1].keys()
    assert all(torch.equal(builds[0][name], builds[1][name]) for name in builds[0])


def test_pixel_table_gives_the_image_processors_pixel_values_bit_for_bit():
    """The vision stage reads its pictures' pixel values off a table instead of running the image
    processor each step; the tower must see exactly what the processor would have given it, and a
    processor that is not per pixel (here: pictures it has to resize) is used as it is."""
    import numpy as np
    import torch

    from fedvlm.edge.tiny_model import build_tiny_vlm
    from fedvlm.edge.vision_pretraining import PixelTable, attribute_batch

    for vision_tower in ("clip", "siglip"):
        _, processor = build_tiny_vlm("tiny", vision_tower=vision_tower)
        table = PixelTable(processor.image_processor, 32)
        rng = np.random.default_rng(5)
        for _ in range(3):
            images, _ = attribute_batch(rng, 16, 32, (0.07, 0.24), 0.4)
            expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            assert torch.equal(table.lookup(images), expected)
            assert torch.equal(table.pixel_values(images), expected)
        assert table.checked is True

    resized = PixelTable(processor.image_processor, 32)
    images, _ = attribute_batch(np.random.default_rng(6), 4, 48, (0.07, 0.24), 0.4)  # not the model's size
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(resized.pixel_values(images), expected)
    assert resized.checked is False
    assert torch.equal(resized.pixel_values(images), expected)


def test_labelled_tokens_loss_equals_the_full_forwards_loss_and_gradients():
    """The language stage may apply the output layer to labelled positions only: the loss and every
    gradient must be those of ``model(**batch).loss``, for image batches and text-only ones."""
    import torch

    from fedvlm.edge.batching import collate
    from fedvlm.edge.data import all_words, pretraining_records
    from fedvlm.edge.pretraining import _text_batch, labelled_tokens_loss
    from fedvlm.edge.tiny_model import build_tiny_vlm
    from fedvlm.edge.training import encode_examples

    model, processor = build_tiny_vlm("tiny", extra_words=all_words())
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    encoded = encode_examples(processor, pretraining_records(6, image_size=32))
    image_batch = collate(encoded, processor.tokenizer.pad_token_id)
    assert (image_batch["labels"] == -100).sum() > 0  # prompts and padding are not labelled
    text_batch = _text_batch(processor.tokenizer, ["red green blue", "one two three four five"])
    for batch in (image_batch, text_batch):
        losses, gradients = [], []
        for loss_of in (lambda: model(**batch).loss, lambda: labelled_tokens_loss(model, batch)):
            loss = loss_of()
            loss.backward()
            losses.append(loss.detach())
            gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[1], losses[0])
        assert gradients[1].keys() == gradients[0].keys()
        for name, gradient in gradients[0].items():
            torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6)


def test_labelled_tokens_loss_leaves_soft_capped_logits_to_the_models_own_forward():
    """Gemma 2's text models (PaliGemma 2) soft-cap their logits after the output layer: the
    output layer alone would train on another loss, so such a model runs its own forward."""
    from fedvlm.edge.batching import collate
    from fedvlm.edge.data import all_words, pretraining_records
    from fedvlm.edge.pretraining import labelled_tokens_loss
    from fedvlm.edge.tiny_model import build_tiny_vlm
    from fedvlm.edge.training import encode_examples

    model, processor = build_tiny_vlm("tiny", extra_words=all_words())
    batch = collate(encode_examples(processor, pretraining_records(2, image_size=32)), processor.tokenizer.pad_token_id)
    full_forwards = []
    model.register_forward_hook(lambda module, args, output: full_forwards.append(1))
    labelled_tokens_loss(model, batch)
    assert not full_forwards  # the saving: the body and the output layer at labelled positions only
    model.config.get_text_config().final_logit_softcapping = 30.0
    labelled_tokens_loss(model, batch)
    assert len(full_forwards) == 1


def test_recipes_written_before_the_cheaper_steps_stay_valid():
    """The labelled-only logits and the fused optimizer change a build's last bits, so they are part
    of the recipe when on, and absent when off: a base cached under an older recipe is still found."""
    from fedvlm.edge.pretraining import _recipe
    from fedvlm.edge.vision_pretraining import VisionPretrainingConfig

    old = _recipe("small", 0, 64, PretrainingConfig(steps=5), vision=VisionPretrainingConfig(steps=5))
    assert "labelled_logits_only" not in old["pretraining"] and "fused_optimizer" not in old["pretraining"]
    assert "fused_optimizer" not in old["vision_pretraining"] and "object_heads" not in old["vision_pretraining"]
    new = _recipe("small", 0, 64, PretrainingConfig(steps=5, labelled_logits_only=True, fused_optimizer=True),
                  vision=VisionPretrainingConfig(steps=5, fused_optimizer=True))
    assert new["pretraining"]["labelled_logits_only"] is True and new["pretraining"]["fused_optimizer"] is True
    assert new["vision_pretraining"]["fused_optimizer"] is True
