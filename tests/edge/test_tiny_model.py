"""The tiny VLMs build deterministically, save, and load back through the real loading code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fedvlm.edge.errors import ModelLoadError
from fedvlm.edge.model_loading import base_fingerprint, load_vlm
from fedvlm.edge.tiny_model import build_tiny_vlm, make_tiny_model, parameter_count


def _inputs(processor, size: int):
    image = Image.new("RGB", (size + 7, size - 3), (200, 30, 30))  # odd size: the processor resizes
    return processor(images=[image], text=["<image>what colour is the shape? rouge"], return_tensors="pt")


@pytest.mark.parametrize("vision_tower", ["clip", "siglip"])
def test_tiny_model_reloads_with_identical_logits(tmp_path, vision_tower):
    built, _ = build_tiny_vlm("tiny", seed=3, vision_tower=vision_tower)
    model_dir = make_tiny_model(tmp_path / "m", "tiny", seed=3, vision_tower=vision_tower)
    loaded = load_vlm(model_dir, quantization="none", device="cpu")
    inputs = _inputs(loaded.processor, 32)
    with torch.no_grad():
        expected = built(**inputs).logits
        actual = loaded.model(**inputs).logits
    assert torch.equal(expected, actual)
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"


def test_sizes_and_determinism():
    tiny_a, _ = build_tiny_vlm("tiny", seed=0)
    tiny_b, _ = build_tiny_vlm("tiny", seed=0)
    tiny_c, _ = build_tiny_vlm("tiny", seed=1)
    small, processor = build_tiny_vlm("small", seed=0)
    assert parameter_count(tiny_a) < 1_000_000
    assert 2_500_000 < parameter_count(small) < 4_000_000
    assert processor.image_processor.crop_size["height"] == 64
    state_a, state_b, state_c = tiny_a.state_dict(), tiny_b.state_dict(), tiny_c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_tokenizer_encodes_any_text(tiny_model_dir):
    tokenizer = load_vlm(tiny_model_dir, quantization="none").processor.tokenizer
    text = "Quelle est la couleur? 日本語 ✓ émoji 🙂 tab\there"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Common words learnt as merges: far fewer tokens than bytes.
    assert len(tokenizer(" what colour is the shape", add_special_tokens=False)["input_ids"]) <= 6


def test_missing_model_is_a_clear_error_never_a_download(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*make-tiny-model"):
        load_vlm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache.*never downloads"):
        load_vlm("llava-hf/llava-1.5-7b-hf")  # a hub id that is not cached here


def test_a_hub_id_loads_from_the_local_cache(tmp_path):
    """``--model ORG/NAME`` resolves through the Hugging Face cache layout, offline."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--fedvlm-test--tiny-smolvlm"
    make_tiny_model(repo / "snapshots" / revision, "tiny", arch="smolvlm")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = ("from fedvlm.edge.model_loading import load_vlm; "
            "v = load_vlm('fedvlm-test/tiny-smolvlm', quantization='none', device='cpu'); "
            "print(type(v.model).__name__, v.model_dir.name)")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SmolVLMForConditionalGeneration", revision]


def test_fingerprint_tells_different_weights_apart(tmp_path):
    a = make_tiny_model(tmp_path / "a", "tiny", seed=0)
    b = make_tiny_model(tmp_path / "b", "tiny", seed=0)
    c = make_tiny_model(tmp_path / "c", "tiny", seed=1)
    assert base_fingerprint(a) == base_fingerprint(b)
    assert base_fingerprint(a) != base_fingerprint(c)


def test_make_tiny_model_cli(tmp_path, capsys):
    from fedvlm.edge.cli import main

    out = tmp_path / "cli-model"
    result = subprocess.run(
        [sys.executable, "-m", "fedvlm.edge.cli", "make-tiny-model", str(out), "--seed", "2"],
        capture_output=True, text=True, check=True,
    )
    assert "parameters" in result.stdout
    assert (out / "config.json").is_file() and (out / "processor_config.json").is_file()
    # A user mistake, in this process (a second interpreter start-up is ~5 s).
    capsys.readouterr()
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(tmp_path),
                 "--state-dir", str(tmp_path / "s")]) == 2  # fmt: skip
    assert "Traceback" not in capsys.readouterr().err
