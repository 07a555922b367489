"""The examples a user copies run end to end on a fresh machine."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Passive OpenMP waiting: on a machine whose cores are busy with other jobs, torch's
# spinning threads made a 7 s `fedvlm-edge train` take 58 s.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


def test_personal_vqa_example(tmp_path):
    script = EXAMPLES / "personal_vqa" / "personal_vqa.py"
    env = ENV
    result = subprocess.run(
        [sys.executable, str(script), "--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-size", "tiny",
         "--demo-images", "3"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("image"))
    assert header.split() == ["image", "alice", "bob"]
    rows = [line.split() for line in lines if line.startswith("picture_")]
    assert [row[0] for row in rows] == [f"picture_{i}.png" for i in range(3)]
    for row in rows:  # an answer from each adapter for every image, in each client's language
        assert len(row) == 3 and all(row[1:]), row
    assert any(row[1] != row[2] for row in rows), "the two clients' adapters should answer differently"

    # Clear errors for a missing folder or adapter, exit status 2.
    demo = tmp_path / "demo"
    missing = subprocess.run(
        [sys.executable, str(script), "--onnx", str(demo / "export"), "--adapter", str(demo / "nobody.onnx_adapter"),
         "--images", str(demo / "images")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert missing.returncode == 2 and "adapter file" in missing.stderr and "does not exist" in missing.stderr
    no_folder = subprocess.run(
        [sys.executable, str(script), "--onnx", str(demo / "export"), "--images", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert no_folder.returncode == 2 and "image folder" in no_folder.stderr


def test_quickstart_federates_and_personalises(tmp_path, capsys):
    """2 devices, 2 rounds on the tiny model: checked from the hub's and devices' files."""
    from fedvlm.edge.device_state import load_state
    from fedvlm.hub import read_status
    from fedvlm.shared import tensor_codec

    work = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart" / "quickstart.py"), "--work-dir", str(work), "--size", "tiny",
         "--clients", "2", "--rounds", "2", "--local-steps", "10", "--examples-per-client", "16",
         "--pretrain-steps", "150"],
        capture_output=True, text=True, timeout=180, env=ENV, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hub: 2 rounds completed, global version 2" in result.stdout
    assert "every device holds the same global B factors: True; their personal A factors all differ: True" \
        in result.stdout

    status = read_status(work / "hub")
    assert status.completed_rounds == 2 and status.last_global.version == 2 and status.accepted_updates == 4
    hub_global, metadata = tensor_codec.decode((work / "hub" / "globals" / "v000002.safetensors").read_bytes())
    assert metadata["round"] == "2" and all("lora_B" in name for name in hub_global)
    states = [load_state(work / "devices" / f"client_{i:02d}") for i in range(2)]
    for state in states:
        assert (state.round, state.global_version) == (2, 2)
        assert len([m for m in state.metrics if m.get("evaluation")]) == 2  # scored after each round
        # The device holds exactly the B's the hub published, and its A's never left it.
        assert state.global_state.keys() == hub_global.keys()
        assert all(np.array_equal(state.global_state[k], hub_global[k]) for k in hub_global)
        assert state.personal and all("lora_A" in name for name in state.personal)
    assert any(np.abs(b).max() > 0 for b in hub_global.values())
    assert any(not np.array_equal(states[0].personal[k], states[1].personal[k]) for k in states[0].personal)

    # A user mistake, in this process (the run above started the script as a user does).
    quickstart = runpy.run_path(str(EXAMPLES / "quickstart" / "quickstart.py"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        quickstart["main"](["--clients", "1"])
    assert refused.value.code == 2 and "--clients must be at least 2" in capsys.readouterr().err


def test_edge_device_example_joins_exports_and_asks(tmp_path):
    """try_locally.sh: a real hub (embedded broker, free port), one device from its config file,
    RLAIF-V JSON Lines + images, fedvlm-edge join / export / ask."""
    from PIL import Image

    from fedvlm.edge.data import load_records
    from fedvlm.edge.device_state import load_state
    from fedvlm.edge.onnx_runner import OnnxVLM
    from fedvlm.edge.pretraining import PretrainingConfig, make_pretrained_tiny_model
    from fedvlm.hub import read_status

    # A briefly pre-trained tiny base, so the device's answer is words, not an empty string.
    model = make_pretrained_tiny_model(tmp_path / "base", "tiny", examples=128,
                                       config=PretrainingConfig(steps=150, progress=False))
    example = EXAMPLES / "edge_device"
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    work = tmp_path / "edge"
    result = subprocess.run(
        [str(example / "try_locally.sh"), "--work-dir", str(work), "--model", str(model), "--size", "tiny",
         "--rounds", "1", "--steps", "5"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    device = work / "device"

    # The data folder is JSON Lines pointing at image files, and the SDK's loader reads it.
    first = json.loads((device / "data" / "train.jsonl").read_text().splitlines()[0])
    assert first["image"] == "images/train_0000.png" and (device / "data" / first["image"]).is_file()
    assert len(load_records(device / "data" / "train.jsonl").records) == 64
    assert (device / "secrets" / "phone-17.secret").stat().st_mode & 0o077 == 0

    # The hub ran its round with this device's update; the device holds the global version.
    status = read_status(work / "hub-state")
    assert status.completed_rounds == 1 and status.last_global.version == 1 and status.accepted_updates == 1
    state = load_state(device / "state")
    assert (state.client_id, state.round, state.global_version) == ("phone-17", 1, 1)

    # export wrote the base and this device's adapter; ask printed what ONNX Runtime answers with it.
    adapter = device / "onnx" / "phone-17.onnx_adapter"
    assert adapter.is_file() and (device / "onnx" / "prefill.onnx").is_file()
    lines = result.stdout.splitlines()
    asked = next(i for i, line in enumerate(lines) if line.startswith("$ fedvlm-edge ask"))
    record = json.loads((device / "data" / "test.jsonl").read_text().splitlines()[0])
    assert f"--image data/{record['image']} --question '{record['question']}'" in lines[asked]
    vlm = OnnxVLM.load(device / "onnx")
    vlm.activate(adapter)
    expected = vlm.answer(Image.open(device / "data" / record["image"]).convert("RGB"), record["question"])
    assert expected and lines[asked + 1] == expected

    # User mistakes: one line, exit status 2.
    help_text = subprocess.run([str(example / "run_device.sh"), "--help"], capture_output=True, text=True, env=env)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: run_device.sh")
    missing = subprocess.run([str(example / "run_device.sh"), "--config", str(tmp_path / "nope.env")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"run_device.sh: error: config file '{tmp_path / 'nope.env'}' does not exist " \
                                     "(copy examples/edge_device/device.env and edit it)"
    bad = subprocess.run([str(example / "try_locally.sh"), "--rounds", "zero"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--rounds needs a positive number" in bad.stderr
