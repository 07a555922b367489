"""ONNX export and `ask` for the model families beyond LLaVA, from the command line a user runs.

Per family, one tiny model of the family's own classes, a device state holding a personal
adapter (random factors, so the adapter visibly changes the answers), `fedvlm-edge export`
and `fedvlm-edge ask`; then ONNX Runtime's greedy answers equal torch's `generate()` token for
token on pictures of different sizes, with the adapter and without (LLaVA-NeXT/OneVision's
export answers at one picture size, recorded in export.json: both sides get the pictures
resized to it). LLaVA's export is tested in depth in test_onnx.py. Families whose forward
does not trace are refused in one line.

An export is ~19 s of torch.export tracing in one Python thread; a second process exports
families meanwhile (see :class:`_Devices`), so on two free cores the nine exports take about
half as long.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fedvlm.edge.adapters import LoraSettings
from fedvlm.edge.cli import main
from fedvlm.edge.device_state import save_state
from fedvlm.edge.evaluation import generate_answers
from fedvlm.edge.onnx_export import NOT_EXPORTABLE
from fedvlm.edge.onnx_runner import OnnxVLM
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.tiny_model import make_tiny_model

EXPORTABLE = ["idefics3", "smolvlm", "paligemma", "gemma3", "internvl", "qwen2_vl", "qwen2_5_vl", "llava_next",
              "llava_onevision"]  # fmt: skip
LORA = LoraSettings(r=4, alpha=8, init_seed=7)
# Different sizes and aspect ratios: different tile counts (Idefics3, SmolVLM, InternVL).
IMAGES = [Image.new("RGB", (32, 32), (230, 20, 20)), Image.new("RGB", (64, 40), (20, 200, 20)),
          Image.new("RGB", (30, 70), (20, 20, 230))]  # fmt: skip
QUESTIONS = ["what colour is it?", "what shape is this, please?", "how many objects are there?"]


def _personalise(model: PersonalVLM) -> dict[str, np.ndarray]:
    """Random LoRA factors, large enough to change the greedy answers."""
    generator = torch.Generator().manual_seed(3)
    state = {k: 0.3 * torch.randn(v.shape, generator=generator).numpy() for k, v in model.adapter_state().items()}
    model.load_adapter_state(state)
    return state


# A second process runs `fedvlm-edge export` for the families from the last one backwards,
# each it claims first (a file created once), and writes its output and exit status beside;
# it stops at the first family this process claimed. One process (one ~6 s import) exports
# several families.
_HELPER = """
import contextlib, os, sys
from pathlib import Path
from fedvlm.edge.cli import main
for root in map(Path, reversed(sys.argv[1:])):
    try:
        os.close(os.open(root / "claimed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        break
    with open(root / "export.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(["export", "--state-dir", str(root / "state"), "--model", str(root / "model"),
                     "--out", str(root / "onnx")])
    (root / "export.rc").write_text(str(code))
"""


def _claim(root) -> bool:
    try:
        os.close(os.open(root / "claimed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _device(arch: str, root) -> PersonalVLM:
    """The family's tiny model with a personal adapter, and the device state holding it."""
    model_dir = make_tiny_model(root / "model", "tiny", arch=arch, seed=0)
    model = PersonalVLM.from_pretrained(model_dir, lora=LORA, quantization="none", device="cpu")
    _personalise(model)
    state = model.device_state(federation="zoo", client_id="carol", round=1, global_version=1,
                               global_state=model.shared_update())  # fmt: skip
    save_state(root / "state", state)
    return model


class _Devices:
    """Every selected family's device, and their exports. An export is ~19 s of torch.export
    tracing in one Python thread while the machine's other core idles, so a second process
    exports families from the last one backwards while this one exports from the first one on
    (and compares answers) until they meet."""

    def __init__(self, archs: list[str], tmp_path_factory):
        self.roots = {arch: tmp_path_factory.mktemp(f"onnx_{arch}") for arch in archs}
        self.models = {arch: _device(arch, root) for arch, root in self.roots.items()}
        self.helper = None
        if len(archs) > 1:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            roots = [str(root) for root in self.roots.values()]
            self.helper_log = tmp_path_factory.mktemp("onnx_helper") / "helper.log"
            with open(self.helper_log, "w") as log:
                self.helper = subprocess.Popen([sys.executable, "-c", _HELPER, *roots], stdout=log,
                                               stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def export(self, arch: str) -> str:
        """Exports ``arch`` (or waits for the helper's export of it); returns what the CLI printed."""
        root = self.roots[arch]
        if _claim(root):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(["export", "--state-dir", str(root / "state"), "--model", str(root / "model"),
                             "--out", str(root / "onnx")]) == 0  # fmt: skip
            return printed.getvalue()
        deadline = time.monotonic() + 600
        while not (root / "export.rc").exists():
            if self.helper.poll() is not None and not (root / "export.rc").exists():  # it may just have finished
                logs = [path.read_text()[-3000:] for path in (root / "export.log", self.helper_log) if path.exists()]
                raise AssertionError("the export process died:\n" + "\n".join(logs))
            assert time.monotonic() < deadline, "the export process took over 10 minutes"
            time.sleep(0.2)
        output = (root / "export.log").read_text()
        assert (root / "export.rc").read_text() == "0", output[-3000:]
        return output

    def close(self) -> None:
        if self.helper is not None and self.helper.poll() is None:
            self.helper.kill()
            self.helper.wait()


@pytest.fixture(scope="module")
def devices(request, tmp_path_factory):
    selected = {item.callspec.params.get("exported") for item in request.session.items if hasattr(item, "callspec")}
    devices = _Devices([arch for arch in EXPORTABLE if arch in selected], tmp_path_factory)
    yield devices
    devices.close()


@pytest.fixture(scope="module", params=EXPORTABLE)
def exported(request, devices):
    """The family's personalised model, exported from its device state by `fedvlm-edge export`."""
    arch = request.param
    root, model = devices.roots[arch], devices.models[arch]
    printed = devices.export(arch)
    # LLaVA-NeXT/OneVision's export answers at one picture size, and says so.
    assert ("answers at one picture size, 64x64" in printed) == (arch in ("llava_next", "llava_onevision"))
    model.model.eval()
    return {"arch": arch, "root": root, "model": model, "onnx": root / "onnx",
            "adapter": root / "onnx" / "carol.onnx_adapter", "vlm": OnnxVLM.load(root / "onnx")}  # fmt: skip


def test_greedy_answers_equal_torch_generate_with_and_without_the_adapter(exported):
    model, vlm = exported["model"], exported["vlm"]
    # What the graphs see: LLaVA-NeXT/OneVision's export answers at one picture size.
    pictures = [vlm.family.picture(image) for image in IMAGES]
    vlm.activate(exported["adapter"])
    personal = generate_answers(model.model, model.processor, pictures, QUESTIONS, max_new_tokens=6)
    assert vlm.answers(IMAGES, QUESTIONS, max_new_tokens=6) == personal
    tokens = vlm.generate(IMAGES, QUESTIONS, max_new_tokens=6)
    vlm.activate(None)
    with model.model.disable_adapter():
        base = generate_answers(model.model, model.processor, pictures, QUESTIONS, max_new_tokens=6)
    assert vlm.answers(IMAGES, QUESTIONS, max_new_tokens=6) == base
    # The adapter is really applied, and the decode graph really ran (several tokens a row).
    assert base != personal
    assert tokens.shape[1] > 1
    fixed_size = exported["arch"] in ("llava_next", "llava_onevision")
    assert (vlm.manifest["fixed_picture_size"] == [64, 64]) if fixed_size else vlm.manifest["fixed_picture_size"] is None


def test_cli_ask_answers_as_the_runtime_does(exported, capsys):
    image = exported["root"] / "picture.png"
    IMAGES[1].save(image)
    capsys.readouterr()
    assert main(["ask", "--onnx", str(exported["onnx"]), "--adapter", str(exported["adapter"]),
                 "--image", str(image), "--question", QUESTIONS[1]]) == 0  # fmt: skip
    vlm = exported["vlm"]
    vlm.activate(exported["adapter"])
    assert capsys.readouterr().out.strip() == vlm.answer(Image.open(image).convert("RGB"), QUESTIONS[1])


@pytest.mark.parametrize("arch", ["mllama"])
def test_a_family_that_cannot_export_is_refused_in_one_line(arch, tmp_path, capsys):
    model_dir = make_tiny_model(tmp_path / "model", "tiny", arch=arch, seed=0)
    model = PersonalVLM.from_pretrained(model_dir, lora=LORA, quantization="none", device="cpu")
    save_state(tmp_path / "state", model.device_state(federation="zoo", client_id="dave", round=1, global_version=1,
                                                      global_state=model.shared_update()))  # fmt: skip
    capsys.readouterr()
    assert main(["export", "--state-dir", str(tmp_path / "state"), "--model", str(model_dir),
                 "--out", str(tmp_path / "onnx")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # after transformers' weight-loading bar
    assert "error: " in err and f"does not support the {arch} family" in err and NOT_EXPORTABLE[arch] in err and "PyTorch" in err
    assert not (tmp_path / "onnx").exists()
