"""Checkpoint files: where they go, and that a write is all-or-nothing."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from fedvlm.hub.checkpoints import CheckpointStore, global_path, update_path
from fedvlm.shared import tensor_codec


def test_layout_of_update_and_global_files(tmp_path: Path):
    assert update_path(tmp_path, 3, "dev-1") == tmp_path / "updates" / "round-000003" / "dev-1.safetensors"
    assert global_path(tmp_path, 12) == tmp_path / "globals" / "v000012.safetensors"


def test_writes_are_complete_private_and_leave_no_temporary_files(tmp_path: Path):
    files = CheckpointStore(tmp_path)
    body = tensor_codec.encode({"x.lora_B.weight": np.ones((2, 2), np.float32)}, {"round": "1"})
    path = files.write_update(1, "dev-1", body)
    assert files.read(path) == body
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    replaced = files.write_update(1, "dev-1", b"newer")
    assert replaced == path and path.read_bytes() == b"newer"
    global_file = files.write_global(1, b"global bytes")
    assert global_file.read_bytes() == b"global bytes"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    files.discard_update(1, "dev-1")
    files.discard_update(1, "dev-1")  # discarding twice is fine
    assert not path.exists()
