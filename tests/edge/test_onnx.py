"""ONNX export with swappable LoRA adapters, against the PyTorch model it came from."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedvlm.edge.adapters import LoraSettings
from fedvlm.edge.cli import main
from fedvlm.edge.device_state import save_state
from fedvlm.edge.errors import EdgeError
from fedvlm.edge.evaluation import generate_answers
from fedvlm.edge.onnx_adapter import OnnxAdapterError, read_adapter_tensors, sidecar_path, write_adapter
from fedvlm.edge.onnx_export import export_onnx, read_manifest
from fedvlm.edge.onnx_runner import OnnxVLM
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.training import TrainingConfig

LORA = LoraSettings(r=4, alpha=8, init_seed=7)
QUICK = TrainingConfig(steps=6, learning_rate=2e-2, progress=False)

IMAGES = [Image.new("RGB", (32, 32), rgb) for rgb in [(230, 20, 20), (20, 200, 20), (20, 20, 230), (200, 200, 30)]]
QUESTIONS = ["what colour is it?", "what shape is this?", "how many objects are there?", "is it big"]


@dataclasses.dataclass
class _Example:
    image: Image.Image
    question: str
    chosen: str


@pytest.fixture(scope="module")
def setup(tiny_model_dir, colour_examples, tmp_path_factory):
    """Two clients' trained adapters, and one export made the way a device makes it: `fedvlm-edge
    export` from alice's device state (one torch.onnx export is ~15 s, so the tests share it)."""
    model = PersonalVLM.from_pretrained(tiny_model_dir, lora=LORA, quantization="none", device="cpu")
    base_state = model.adapter_state()
    out = tmp_path_factory.mktemp("onnx")
    states = {}
    french = {"red": "rouge", "green": "vert", "blue": "bleu"}
    data = {
        "alice": colour_examples,
        "bob": [_Example(e.image, e.question, french[e.chosen]) for e in colour_examples],
    }
    for client, examples in data.items():
        model.reset_adapters()
        model.train(examples, QUICK)
        states[client] = model.adapter_state()
    model.load_adapter_state(states["alice"])
    save_state(out / "state", model.device_state(federation="demo", client_id="alice", round=3, global_version=3,
                                                 global_state=model.shared_update()))  # fmt: skip
    assert main(["export", "--state-dir", str(out / "state"), "--model", str(tiny_model_dir),
                 "--out", str(out / "export")]) == 0  # fmt: skip
    export_dir = out / "export"
    manifest = read_manifest(export_dir)
    adapters = {client: write_adapter(out / f"{client}.onnx_adapter", states[client], manifest) for client in states}
    model.model.eval()
    return {"model": model, "base": base_state, "states": states, "adapters": adapters, "dir": export_dir,
            "manifest": manifest, "out": out, "vlm": OnnxVLM.load(export_dir)}


def _torch_logits(model: PersonalVLM, state, inputs):
    model.load_adapter_state(state)
    with torch.no_grad():
        return model.model(**inputs).logits.numpy()


def _valid_diff(a, b, mask) -> float:
    """Max abs difference over real (not left-padding) positions; padded rows attend to nothing."""
    keep = mask.astype(bool)
    return float(np.abs(a[keep] - b[keep]).max())


def test_adapters_differ_and_logits_match_pytorch(setup):
    model, vlm = setup["model"], setup["vlm"]
    assert any(not np.allclose(setup["states"]["alice"][k], setup["states"]["bob"][k]) for k in setup["base"])
    inputs = vlm.prompt_format.prompt_batch(IMAGES, QUESTIONS)
    mask = inputs["attention_mask"].numpy()
    assert (mask == 0).any()  # left padding is exercised
    for client in ("alice", "bob"):
        vlm.activate(setup["adapters"][client])
        (onnx_logits, *_), onnx_mask, _ = vlm.prefill_batch(IMAGES, QUESTIONS)
        np.testing.assert_array_equal(onnx_mask, mask)  # the rows prefilled one by one, padded as generate() pads
        assert _valid_diff(onnx_logits, _torch_logits(model, setup["states"][client], inputs), mask) <= 1e-4


def test_no_adapter_is_the_base_model_and_switching_is_stable(setup):
    model, vlm = setup["model"], setup["vlm"]
    inputs = vlm.prompt_format.prompt_batch(IMAGES, QUESTIONS)
    mask = inputs["attention_mask"].numpy()
    vlm.activate(None)
    base = vlm.prefill_batch(IMAGES, QUESTIONS)[0][0]
    assert _valid_diff(base, _torch_logits(model, setup["base"], inputs), mask) <= 1e-4
    with model.model.disable_adapter(), torch.no_grad():
        assert _valid_diff(base, model.model(**inputs).logits.numpy(), mask) <= 1e-4
    seen = {}
    for client in ["alice", "bob", "alice", None, "bob"]:
        vlm.activate(setup["adapters"][client] if client else None)
        logits = vlm.prefill_batch(IMAGES, QUESTIONS)[0][0]
        if client in seen:
            np.testing.assert_array_equal(logits, seen[client])
        seen[client] = logits
    assert _valid_diff(seen["alice"], seen["bob"], mask) > 1e-3


def test_greedy_answers_equal_pytorch_generate(setup):
    model, vlm = setup["model"], setup["vlm"]
    lengths = []
    for client in ("alice", "bob", None):
        state = setup["states"][client] if client else setup["base"]
        model.load_adapter_state(state)
        expected = generate_answers(model.model, model.processor, IMAGES, QUESTIONS, max_new_tokens=8)
        vlm.activate(setup["adapters"][client] if client else None)
        assert vlm.answers(IMAGES, QUESTIONS, max_new_tokens=8) == expected
        lengths += [int((row != model.processor.tokenizer.pad_token_id).sum()) for row in vlm.generate(IMAGES, QUESTIONS)]
        assert [vlm.answer(i, q, max_new_tokens=8) for i, q in zip(IMAGES[:2], QUESTIONS[:2])] == [
            model.answer(i, q, max_new_tokens=8) for i, q in zip(IMAGES[:2], QUESTIONS[:2])
        ]
    # The decode-step graph really ran: some answers are several tokens long, some stop early.
    assert max(lengths) == 8 and min(lengths) < 8


def test_adapter_file_holds_exactly_the_clients_lora_tensors(setup):
    stored = read_adapter_tensors(setup["adapters"]["alice"])
    by_name = {name: entry["peft_key"] for name, entry in setup["manifest"]["lora_inputs"].items()}
    assert set(stored) == set(by_name)
    assert set(by_name.values()) == set(setup["states"]["alice"])
    for name, array in stored.items():
        np.testing.assert_array_equal(array, setup["states"]["alice"][by_name[name]])
    meta = json.loads(sidecar_path(setup["adapters"]["alice"]).read_text())
    assert meta["base_fingerprint"] == setup["model"].fingerprint
    assert meta["lora_config_hash"] == LORA.config_hash()


def test_corrupt_or_mismatched_adapters_are_refused(setup):
    vlm, out, manifest = setup["vlm"], setup["out"], setup["manifest"]
    good = setup["adapters"]["alice"]
    with pytest.raises(OnnxAdapterError, match="does not exist"):
        vlm.activate(out / "nobody.onnx_adapter")

    corrupt = out / "corrupt.onnx_adapter"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    sidecar_path(corrupt).write_text(sidecar_path(good).read_text())
    with pytest.raises(OnnxAdapterError, match="corrupt"):
        vlm.activate(corrupt)

    truncated = out / "truncated.onnx_adapter"
    truncated.write_bytes(good.read_bytes()[:100])
    meta = json.loads(sidecar_path(good).read_text())
    import hashlib

    sidecar_path(truncated).write_text(json.dumps({**meta, "sha256": hashlib.sha256(truncated.read_bytes()).hexdigest()}))
    with pytest.raises(OnnxAdapterError, match="not a readable ONNX adapter"):
        vlm.activate(truncated)

    other_base = write_adapter(out / "other.onnx_adapter", setup["states"]["alice"],
                               {**manifest, "base_fingerprint": "0123456789abcdef"})
    with pytest.raises(OnnxAdapterError, match="base model"):
        vlm.activate(other_base)

    wrong_shape = {k: (v[:-1] if ".lora_A." in k else v) for k, v in setup["states"]["alice"].items()}
    lying = {**manifest, "lora_inputs": {n: {**e, "shape": list(wrong_shape[e["peft_key"]].shape)}
                                         for n, e in manifest["lora_inputs"].items()}}
    bad_shapes = write_adapter(out / "shapes.onnx_adapter", wrong_shape, lying)
    with pytest.raises(OnnxAdapterError, match="shape"):
        vlm.activate(bad_shapes)

    with pytest.raises(OnnxAdapterError, match="does not match the export's LoRA layout"):
        write_adapter(out / "missing.onnx_adapter", dict(list(setup["states"]["alice"].items())[1:]), manifest)
    assert issubclass(OnnxAdapterError, EdgeError)
    vlm.activate(good)  # the good one still loads after all that


def test_merged_export_equals_adapter_export(setup):
    model, vlm = setup["model"], setup["vlm"]
    model.load_adapter_state(setup["states"]["bob"])
    merged = OnnxVLM.load(export_onnx(model, setup["out"] / "merged", merged=True))
    assert read_manifest(merged.onnx_dir)["lora_inputs"] == {}
    with pytest.raises(EdgeError, match="merged"):
        merged.activate(setup["adapters"]["bob"])
    vlm.activate(setup["adapters"]["bob"])
    merged_logits, mask, _ = merged.prefill_batch(IMAGES, QUESTIONS)
    assert _valid_diff(merged_logits[0], vlm.prefill_batch(IMAGES, QUESTIONS)[0][0], mask) <= 1e-4
    assert merged.answers(IMAGES, QUESTIONS) == vlm.answers(IMAGES, QUESTIONS)


def test_cli_export_and_ask(setup, capsys):
    # The shared export is the CLI's, from alice's device state: its adapter holds what
    # write_adapter writes for her trained factors.
    out, cli_dir = setup["out"], setup["dir"]
    stored = read_adapter_tensors(cli_dir / "alice.onnx_adapter")
    expected = read_adapter_tensors(setup["adapters"]["alice"])
    assert set(stored) == set(expected)
    for name in stored:
        np.testing.assert_array_equal(stored[name], expected[name])

    image = out / "red.png"
    IMAGES[0].save(image)
    capsys.readouterr()
    assert main(["ask", "--onnx", str(cli_dir), "--adapter", str(cli_dir / "alice.onnx_adapter"),
                 "--image", str(image), "--question", QUESTIONS[0]]) == 0
    setup["vlm"].activate(setup["adapters"]["alice"])
    assert capsys.readouterr().out.strip() == setup["vlm"].answer(IMAGES[0], QUESTIONS[0])

    other = write_adapter(out / "elsewhere.onnx_adapter", setup["states"]["alice"],
                          {**setup["manifest"], "base_fingerprint": "fedcba9876543210"})
    assert main(["ask", "--onnx", str(cli_dir), "--adapter", str(other), "--image", str(image),
                 "--question", QUESTIONS[0]]) == 2
    assert "made for base model fedcba9876543210" in capsys.readouterr().err
