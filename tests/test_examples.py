"""The examples a user copies run end to end on a fresh machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_personal_vqa_example(tmp_path):
    script = EXAMPLES / "personal_vqa" / "personal_vqa.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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
