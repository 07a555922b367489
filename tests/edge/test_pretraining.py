"""Pre-training a tiny base: the loss falls, the result is cached by recipe and loads back."""

from __future__ import annotations

import json

from fedvlm.edge.model_loading import load_vlm
from fedvlm.edge.pretraining import PretrainingConfig, is_built, make_pretrained_tiny_model


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
