"""Every supported VLM family, end to end on a tiny random-weight model of its own.

Each model is built from the family's own config classes, image processor and chat
template (``fedvlm-edge make-tiny-model --arch``), saved with ``save_pretrained`` and loaded
back through the real loading code. The checks: the batch is what the family's processor
returns (nothing dropped, several pictures of different sizes padded correctly), labels
end with the template's own end-of-turn token, LoRA goes where the settings say on the
family's own module names, the quantised base trains, and the command lines a user runs
(`fedvlm-edge train --eval-data`, `fedvlm simulate --model`) work.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fedvlm.edge.adapters import attach_lora, lora_target_modules
from fedvlm.edge.batching import IGNORE_INDEX, collate
from fedvlm.edge.chat_format import ChatFormat
from fedvlm.edge.errors import LoraTargetError
from fedvlm.edge.model_loading import load_vlm
from fedvlm.edge.tiny_model import ARCHITECTURES, build_tiny_vlm, make_tiny_model
from fedvlm.shared.lora_config import LoraSettings, module_part

FAMILIES = list(ARCHITECTURES)
# What each family's template ends an assistant turn with.
END_OF_TURN = {
    "llava": "</s>", "llava_next": "</s>", "llava_onevision": "<|im_end|>", "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "paligemma": "<eos>",
    "gemma3": "<end_of_turn>", "internvl": "<|im_end|>", "mllama": "<|eot_id|>",
}  # fmt: skip
# Inputs beyond ids, attention mask and pixels that each family's forward needs.
FAMILY_INPUTS = {
    "llava_next": {"image_sizes"}, "llava_onevision": {"image_sizes", "batch_num_images"},
    "idefics3": {"pixel_attention_mask"}, "smolvlm": {"pixel_attention_mask"},
    "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"}, "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
    "paligemma": {"token_type_ids"}, "gemma3": {"token_type_ids"},
    "mllama": {"aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"},
}  # fmt: skip
# Two pictures of different sizes and aspect ratios: different tile counts and patch grids.
PICTURES = [Image.new("RGB", (64, 40), (220, 30, 30)), Image.new("RGB", (30, 70), (30, 200, 40))]
QUESTIONS = ["what colour is the shape?", "is the shape on the left or the right side of the picture?"]
ANSWERS = ["red", "on the left"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every family's tiny model, saved once."""
    root = tmp_path_factory.mktemp("zoo")
    return {arch: make_tiny_model(root / arch, "tiny", arch=arch, seed=0) for arch in FAMILIES}


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_reloads_with_identical_logits(zoo, arch):
    built, processor = build_tiny_vlm("tiny", arch=arch, seed=0)
    loaded = load_vlm(zoo[arch], quantization="none", device="cpu")
    chat = ChatFormat.for_model(loaded.processor, loaded.model)
    batch = collate([chat.encode(PICTURES[0], QUESTIONS[0], ANSWERS[0])], loaded.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(built(**batch).logits, loaded.model(**batch).logits)
    assert loaded.processor.chat_template == processor.chat_template


@pytest.mark.parametrize("arch", FAMILIES)
def test_labels_cover_the_answer_and_end_with_the_templates_end_of_turn(zoo, arch):
    loaded = load_vlm(zoo[arch], quantization="none", device="cpu")
    chat = ChatFormat.for_model(loaded.processor, loaded.model)
    tokenizer = loaded.processor.tokenizer
    example = chat.encode(PICTURES[1], QUESTIONS[1], ANSWERS[1])
    answer_ids = example.labels[example.labels != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(int(answer_ids[-1])) == END_OF_TURN[arch]
    assert tokenizer.decode(answer_ids[:-1]).strip() == ANSWERS[1]
    assert int(example.labels.ne(IGNORE_INDEX).nonzero()[0]) > 0, "the prompt must not be trained on"
    # Every input the family's forward needs travels with the example.
    assert FAMILY_INPUTS.get(arch, set()) | {"input_ids", "attention_mask", "pixel_values"} == set(example.inputs)
    assert chat.end_of_turn_id in chat.stop_token_ids


@pytest.mark.parametrize("arch", FAMILIES)
def test_batches_of_different_pictures_match_one_at_a_time(zoo, arch):
    """Padding and collation are right for every layout: each example's loss and greedy
    answer in a batch are what they are alone."""
    loaded = load_vlm(zoo[arch], quantization="none", device="cpu")
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    chat = ChatFormat.for_model(loaded.processor, model)
    examples = [chat.encode(p, q, a) for p, q, a in zip(PICTURES, QUESTIONS, ANSWERS)]

    def per_example_losses(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none",
                                                   ignore_index=IGNORE_INDEX)
        return losses.sum(1) / labels.ne(IGNORE_INDEX).sum(1)

    with torch.no_grad():
        together = per_example_losses(collate(examples, tokenizer.pad_token_id))
        alone = torch.cat([per_example_losses(collate([e], tokenizer.pad_token_id)) for e in examples])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)

    def greedy(images, questions):
        batch = chat.prompt_batch(images, questions)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=chat.stop_token_ids,
                                 pad_token_id=tokenizer.pad_token_id)
        return [row[batch["input_ids"].shape[1]:].tolist() for row in out]

    batched = greedy(PICTURES, QUESTIONS)
    singles = [greedy([p], [q])[0] for p, q in zip(PICTURES, QUESTIONS)]
    for row, single in zip(batched, singles):
        assert row[: len(single)] == single


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_goes_on_the_parts_the_settings_name(zoo, arch):
    model = load_vlm(zoo[arch], quantization="none", device="cpu").model
    default = lora_target_modules(model, LoraSettings())
    assert default and all(module_part(name) == "language" for name in default)
    kinds = {name.rsplit(".", 1)[-1] for name in default}
    assert {"q_proj", "v_proj", "down_proj"} <= kinds  # attention and MLP
    vision = lora_target_modules(model, LoraSettings(parts=("vision",)))
    assert vision and all(module_part(name) == "vision" for name in vision)
    if arch == "gemma3":  # its projector is a norm and a pooling with a plain weight: no linear layer
        with pytest.raises(LoraTargetError, match="projector"):
            lora_target_modules(model, LoraSettings(parts=("language", "projector")))
    else:
        projector = lora_target_modules(model, LoraSettings(parts=("projector",)))
        assert projector and all(module_part(name) == "projector" for name in projector)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantised_base_trains_its_lora_factors(zoo, arch, quantization):
    from fedvlm.edge.training import TrainingConfig, train

    loaded = load_vlm(zoo[arch], quantization=quantization, device="cpu")
    quantised = [n for n, m in loaded.model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert quantised and all(module_part(n) == "language" for n in quantised), "only the language model is quantised"
    assert not any(module_part(n) == "vision" for n in quantised)
    model = attach_lora(loaded.model, LoraSettings(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    class Example:
        def __init__(self, image, question, chosen):
            self.image, self.question, self.chosen = image, question, chosen

    examples = [Example(p, q, a) for p, q, a in zip(PICTURES, QUESTIONS, ANSWERS)]
    metrics = train(model, loaded.processor, examples, TrainingConfig(steps=2, batch_size=2, progress=False))
    assert torch.isfinite(torch.tensor(metrics.loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any(".lora_B." in n for n in changed)


@pytest.fixture(scope="module")
def device_data(tmp_path_factory):
    from fedvlm.edge.data import ScenarioConfig, generate_federation

    out = tmp_path_factory.mktemp("device-data")
    config = ScenarioConfig.preset("concept-shift", n_clients=2, examples_per_client=6, test_examples_per_client=4,
                                   image_size=32, seed=3)
    generate_federation(config).write(out)
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_edge_train_with_eval_data_from_the_command_line(zoo, device_data, arch, tmp_path, capsys):
    from fedvlm.edge.cli import main

    code = main(["train", "--model", str(zoo[arch]), "--data", str(device_data / "client_00.parquet"),
                 "--eval-data", str(device_data / "client_00_test.parquet"), "--state-dir", str(tmp_path / "state"),
                 "--steps", "2", "--batch-size", "2", "--rank", "4", "--quantization", "nf4"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert report["train"]["steps"] == 2 and set(report) == {"objective", "before", "train", "after"}
    assert 0.0 <= report["after"]["accuracy"] <= 1.0 and report["after"]["loss"] > 0


@pytest.mark.parametrize("arch", FAMILIES)
def test_simulate_runs_on_the_family(zoo, arch, tmp_path, capsys):
    from fedvlm.cli import main

    out = tmp_path / "simulate"
    code = main(["simulate", "--model", str(zoo[arch]), "--clients", "2", "--rounds", "1", "--local-steps", "1",
                 "--strategies", "plora,fedit", "--seeds", "0", "--examples-per-client", "4",
                 "--test-examples-per-client", "2", "--global-test-size", "4", "--batch-size", "2",
                 "--lora-rank", "2", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["strategies"]) == {"plora", "fedit"}
    assert results["args"]["model"] == str(zoo[arch])
