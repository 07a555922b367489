"""write_durably: whole or in pieces, the file holds exactly the bytes given, private to its owner."""

from __future__ import annotations

import stat

from fedvlm.shared.durable_files import write_durably


def test_pieces_are_written_in_order_without_joining(tmp_path):
    body = memoryview(bytes(range(256)) * 100)
    path = write_durably(tmp_path / "deep" / "update.bin", [b"prefix:", body[10:5000], memoryview(b"!")])
    assert path.read_bytes() == b"prefix:" + bytes(body[10:5000]) + b"!"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_durably(path, b"replaced")  # one buffer, as before
    assert path.read_bytes() == b"replaced"
    assert [p.name for p in path.parent.iterdir()] == ["update.bin"]  # no temporary left
