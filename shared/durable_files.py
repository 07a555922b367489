"""Atomic, durable file writes: the one way FedVLM replaces a file that must survive a crash."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_durably(path: str | os.PathLike, data: bytes | Sequence[bytes | memoryview]) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (0600): after a crash at any point
    the file holds either its old or its new content, never a mix, and no temporary remains.
    ``data`` may be a sequence of buffers, written one after the other (no joined copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A temporary of its own (0600) for every writer, threads of one process included.
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(temporary_name)
    try:
        try:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                view = memoryview(piece).cast("B")
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
