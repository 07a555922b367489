"""The state a device keeps between rounds, in one directory, written atomically.

Layout of ``state_dir``::

    CURRENT                    name of the committed snapshot (replaced atomically)
    snapshot-000007/
        state.json             federation, client, strategy, round, global version, configs
        personal.safetensors   the personal factors: never leave the device
        global.safetensors     the last global state received (shared factors, base deltas)
        shared.safetensors     the shared factors as they are on the device now
        adapter/               the full adapter (global + personal) in PEFT's own format

A save writes a whole new snapshot directory, fsyncs it, then swaps ``CURRENT`` with
``os.replace``. A crash at any point leaves the previous snapshot committed and readable;
stale half-written snapshots are removed by the next save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from fedvlm.edge.errors import DeviceStateError
from fedvlm.shared.durable_files import write_durably

CURRENT = "CURRENT"
_SNAPSHOT_PREFIX = "snapshot-"
STATE_VERSION = 1




@dataclasses.dataclass
class DeviceState:
    """What a device remembers. ``personal`` never leaves the device."""

    federation: str
    client_id: str
    strategy: str
    base_fingerprint: str
    lora: dict
    round: int = 0
    global_version: int = 0
    personal: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    global_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # The shared factors as they are on the device now: the last global ones, or what the
    # device trained since (local training without a hub, or a round's update not yet merged).
    current_shared: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    updated_at: float = 0.0
    # The strategy's options as the device trained with them (the hub's announcement in a
    # federation): commands that rebuild the model from the state (export, resumed training)
    # build the same strategy, not one at its defaults. {} in a state saved before they were kept.
    strategy_options: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "state_version": STATE_VERSION,
            "federation": self.federation,
            "client_id": self.client_id,
            "strategy": self.strategy,
            "strategy_options": self.strategy_options,
            "base_fingerprint": self.base_fingerprint,
            "lora": self.lora,
            "round": self.round,
            "global_version": self.global_version,
            "metrics": self.metrics,
            "updated_at": self.updated_at,
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, writer: Callable[[Path], None]) -> None:
    writer(path)
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def save_state(
    state_dir: str | os.PathLike,
    state: DeviceState,
    *,
    write_peft_adapter: Callable[[Path], None] | None = None,
) -> Path:
    """Commit ``state`` as a new snapshot; returns its directory.

    ``write_peft_adapter(dir)`` (e.g. ``peft_model.save_pretrained``) adds the full adapter
    in PEFT's format to the snapshot, so ``PeftModel.from_pretrained`` loads it.
    """
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    committed = _committed_snapshot_name(root)
    number = int(committed[len(_SNAPSHOT_PREFIX) :]) + 1 if committed else 1
    snapshot = root / f"{_SNAPSHOT_PREFIX}{number:06d}"
    if snapshot.exists():  # left over from a save that crashed before committing
        shutil.rmtree(snapshot)
    snapshot.mkdir()
    state.updated_at = time.time()
    _write_file(snapshot / "state.json", lambda p: p.write_text(json.dumps(state.describe(), indent=2)))
    _write_file(snapshot / "personal.safetensors", lambda p: save_file(_contiguous(state.personal), str(p)))
    _write_file(snapshot / "global.safetensors", lambda p: save_file(_contiguous(state.global_state), str(p)))
    _write_file(snapshot / "shared.safetensors", lambda p: save_file(_contiguous(state.current_shared), str(p)))
    if write_peft_adapter is not None:
        write_peft_adapter(snapshot / "adapter")
    _fsync_dir(snapshot)

    write_durably(root / CURRENT, snapshot.name.encode())  # the commit point
    _remove_other_snapshots(root, keep=snapshot.name)
    return snapshot


def _contiguous(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _committed_snapshot_name(root: Path) -> str | None:
    pointer = root / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not name.startswith(_SNAPSHOT_PREFIX) or not (root / name).is_dir():
        raise DeviceStateError(
            f"{pointer} points to {name!r}, which is not a snapshot in {root}: the state "
            "directory was edited by hand or damaged; restore it or start with an empty one"
        )
    return name


def _remove_other_snapshots(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(_SNAPSHOT_PREFIX) and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def committed_snapshot(state_dir: str | os.PathLike) -> Path | None:
    """The directory of the committed snapshot, or None for a fresh device."""
    root = Path(state_dir)
    name = _committed_snapshot_name(root) if root.exists() else None
    return root / name if name else None


def load_state(state_dir: str | os.PathLike) -> DeviceState | None:
    """The committed state, or None when the device has none yet."""
    snapshot = committed_snapshot(state_dir)
    if snapshot is None:
        return None
    try:
        info = json.loads((snapshot / "state.json").read_text())
        personal = load_file(str(snapshot / "personal.safetensors"))
        global_state = load_file(str(snapshot / "global.safetensors"))
        current_shared = load_file(str(snapshot / "shared.safetensors"))
    except (OSError, ValueError) as exc:
        raise DeviceStateError(f"device state in {snapshot} is unreadable: {exc}") from exc
    if info.get("state_version") != STATE_VERSION:
        raise DeviceStateError(
            f"device state in {snapshot} has format version {info.get('state_version')}, "
            f"this SDK reads version {STATE_VERSION}"
        )
    return DeviceState(
        federation=info["federation"],
        client_id=info["client_id"],
        strategy=info["strategy"],
        base_fingerprint=info["base_fingerprint"],
        lora=info["lora"],
        round=info["round"],
        global_version=info["global_version"],
        personal=personal,
        global_state=global_state,
        current_shared=current_shared,
        metrics=info.get("metrics", []),
        updated_at=info.get("updated_at", 0.0),
        strategy_options=info.get("strategy_options") or {},
    )


def check_compatible(state: DeviceState, *, federation: str, client_id: str, base_fingerprint: str, lora: dict,
                     strategy: str | None = None) -> None:
    """Refuse to resume a state that belongs to another federation, client, base or layout."""
    mismatches = [
        (what, saved, wanted)
        for what, saved, wanted in (
            ("federation", state.federation, federation),
            ("client id", state.client_id, client_id),
            ("base model fingerprint", state.base_fingerprint, base_fingerprint),
            ("LoRA settings", state.lora, lora),
            ("strategy", state.strategy, strategy if strategy is not None else state.strategy),
        )
        if saved != wanted
    ]
    if mismatches:
        what, saved, wanted = mismatches[0]
        raise DeviceStateError(
            f"the state directory holds a different {what} ({saved!r}, this run uses {wanted!r}); "
            "use another --state-dir for a different federation, client or model"
        )
