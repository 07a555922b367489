"""Files in the state directory: accepted updates and global versions, written durably.

Layout::

    <state_dir>/updates/round-000001/<client_id>.safetensors   one accepted update (its body)
    <state_dir>/globals/v000001.safetensors                     one global version (its payload)

Every file is written to a temporary name, fsynced, renamed into place and its directory
fsynced, so after a crash a file is either complete or absent. The hub writes an update
here *before* it commits the receipt and acknowledges the client: an acknowledged update
is always on disk. Client ids are safe file names (the protocol restricts them to
letters, digits, ``._-``, not starting with a dot).
"""

from __future__ import annotations

from pathlib import Path

from fedvlm.shared.durable_files import write_durably
from fedvlm.shared.protocol import validate_client_id

__all__ = ["CheckpointStore", "update_path", "global_path"]


def update_path(state_dir: Path, round_number: int, client_id: str) -> Path:
    return Path(state_dir) / "updates" / f"round-{round_number:06d}" / f"{validate_client_id(client_id)}.safetensors"


def global_path(state_dir: Path, version: int) -> Path:
    return Path(state_dir) / "globals" / f"v{version:06d}.safetensors"


class CheckpointStore:
    """Reads and durably writes the hub's files under ``state_dir``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)

    def write_update(self, round_number: int, client_id: str, body: bytes) -> Path:
        """Store an accepted update's safetensors body; returns its path (replacing an older file)."""
        return write_durably(update_path(self.state_dir, round_number, client_id), body)

    def write_global(self, version: int, payload: bytes) -> Path:
        """Store a global version's safetensors payload (the exact bytes that are published)."""
        return write_durably(global_path(self.state_dir, version), payload)

    @staticmethod
    def read(path: str | Path) -> bytes:
        return Path(path).read_bytes()

    def discard_update(self, round_number: int, client_id: str) -> None:
        """Remove an update file whose receipt was never committed (best effort)."""
        update_path(self.state_dir, round_number, client_id).unlink(missing_ok=True)
