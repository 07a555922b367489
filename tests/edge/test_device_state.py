"""Device state: round trips, and a crash at any point of a save leaves the last state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedvlm.edge import device_state
from fedvlm.edge.device_state import DeviceState, check_compatible, load_state, save_state
from fedvlm.edge.errors import DeviceStateError


def _state(round_number: int, value: float) -> DeviceState:
    return DeviceState(
        federation="fed", client_id="c0", strategy="plora", base_fingerprint="abc", lora={"r": 4},
        round=round_number, global_version=round_number,
        personal={"m.lora_A.weight": np.full((4, 8), value, np.float32)},
        global_state={"m.lora_B.weight": np.full((8, 4), -value, np.float32)},
        metrics=[{"round": round_number}],
    )


def test_round_trip(tmp_path):
    assert load_state(tmp_path / "fresh") is None
    save_state(tmp_path, _state(1, 1.0))
    save_state(tmp_path, _state(2, 2.0))
    loaded = load_state(tmp_path)
    assert loaded.round == 2 and loaded.global_version == 2
    np.testing.assert_array_equal(loaded.personal["m.lora_A.weight"], np.full((4, 8), 2.0, np.float32))
    np.testing.assert_array_equal(loaded.global_state["m.lora_B.weight"], np.full((8, 4), -2.0, np.float32))
    # Old snapshots are cleaned up once the new one is committed.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["snapshot-000002"]


@pytest.mark.parametrize("failing_step", ["personal", "adapter", "commit"])
def test_crash_mid_save_keeps_previous_state(tmp_path, monkeypatch, failing_step):
    save_state(tmp_path, _state(1, 1.0))

    def crash(*_args, **_kwargs):
        raise OSError("disk full (simulated)")

    writer = None
    if failing_step == "personal":
        monkeypatch.setattr(device_state, "save_file", crash)
    elif failing_step == "adapter":
        writer = crash
    else:
        monkeypatch.setattr(device_state.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_state(tmp_path, _state(2, 2.0), write_peft_adapter=writer)
    monkeypatch.undo()

    survivor = load_state(tmp_path)
    assert survivor.round == 1
    np.testing.assert_array_equal(survivor.personal["m.lora_A.weight"], np.full((4, 8), 1.0, np.float32))
    # The next save succeeds and replaces the half-written snapshot.
    save_state(tmp_path, _state(3, 3.0))
    assert load_state(tmp_path).round == 3


def test_damaged_pointer_is_a_clear_error(tmp_path):
    save_state(tmp_path, _state(1, 1.0))
    (tmp_path / "CURRENT").write_text("elsewhere")
    with pytest.raises(DeviceStateError, match="not a snapshot"):
        load_state(tmp_path)


def test_refuses_a_state_of_another_federation_or_base(tmp_path):
    state = _state(1, 1.0)
    check_compatible(state, federation="fed", client_id="c0", base_fingerprint="abc", lora={"r": 4})
    with pytest.raises(DeviceStateError, match="base model fingerprint"):
        check_compatible(state, federation="fed", client_id="c0", base_fingerprint="xyz", lora={"r": 4})
    with pytest.raises(DeviceStateError, match="federation"):
        check_compatible(state, federation="other", client_id="c0", base_fingerprint="abc", lora={"r": 4})


def test_the_strategy_options_travel_with_the_state(tmp_path, tiny_model_dir):
    """A device keeps its strategy's options (in a federation, the hub's announcement), so what
    rebuilds the model from the state (``fedvlm-edge export``, resumed ``train``) builds the same
    strategy; a state saved before they were kept reads as the defaults ({})."""
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.lora_config import LoraSettings
    from fedvlm.shared.strategies import build_strategy

    lora = LoraSettings(r=4, alpha=8)
    strategy = build_strategy("plora", {"shared_lr_scale": 2}, lora)
    model = PersonalVLM.from_pretrained(tiny_model_dir, lora=lora, strategy=strategy, quantization="none")
    save_state(tmp_path, model.device_state(federation="fed", client_id="c0", round=1, global_version=1,
                                            global_state={}))  # fmt: skip
    loaded = load_state(tmp_path)
    assert loaded.strategy_options["shared_lr_scale"] == 2
    assert build_strategy(loaded.strategy, loaded.strategy_options, lora).options() == strategy.options()

    save_state(tmp_path / "old", _state(1, 1.0))
    pointer = next((tmp_path / "old").glob("snapshot-*/state.json"))
    info = json.loads(pointer.read_text())
    del info["strategy_options"]  # as an SDK before this wrote it
    pointer.write_text(json.dumps(info))
    assert load_state(tmp_path / "old").strategy_options == {}
