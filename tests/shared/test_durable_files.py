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


def test_two_threads_writing_one_file_never_tear_it(tmp_path):
    """Each writer has a temporary of its own (the edge saves on a thread), so concurrent
    writers leave one complete version, never a mix, and no error."""
    import threading

    path, errors = tmp_path / "update.bin", []

    def write(byte: int) -> None:
        try:
            write_durably(path, bytes([byte]) * 1_000_000)
        except OSError as error:
            errors.append(error)

    for _ in range(10):
        writers = [threading.Thread(target=write, args=(byte,)) for byte in (1, 2)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        assert path.read_bytes() in (b"\x01" * 1_000_000, b"\x02" * 1_000_000)
    assert not errors and [p.name for p in tmp_path.iterdir()] == ["update.bin"]
