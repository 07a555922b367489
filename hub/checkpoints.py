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

import os
from pathlib import Path

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
        return _write_durably(update_path(self.state_dir, round_number, client_id), body)

    def write_global(self, version: int, payload: bytes) -> Path:
        """Store a global version's safetensors payload (the exact bytes that are published)."""
        return _write_durably(global_path(self.state_dir, version), payload)

    @staticmethod
    def read(path: str | Path) -> bytes:
        return Path(path).read_bytes()

    def discard_update(self, round_number: int, client_id: str) -> None:
        """Remove an update file whose receipt was never committed (best effort)."""
        update_path(self.state_dir, round_number, client_id).unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a disk-full half-file must not linger
        raise
    # The rename is durable only once the directory entry is on disk too.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path
