"""Load RLAIF-V records from parquet, JSON Lines, or a folder of them.

Accepted ``image`` values, as RLAIF-V and Hugging Face ``datasets`` store them and as people
write them by hand:

- a struct / object ``{"bytes": ..., "path": ...}`` (the HF ``Image`` feature): the bytes
  if present, else the path; in JSON Lines the bytes are base64 text;
- raw bytes (a parquet ``binary`` column);
- a path string. Relative paths are relative to the data file's folder, so a data set
  folder can be moved or copied to a device as a whole.

Required per record: ``image``, a non-blank ``question`` and a non-blank ``chosen``.
``rejected`` and ``origin_dataset`` are optional. Rows are numbered from 0 in parquet
(as ``datasets`` indexes them) and lines from 1 in JSON Lines (as editors show them).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from fedvlm.edge.data.file_rows import RawRow, data_files, raw_rows
from fedvlm.edge.data.records import DataError, LoadedRecords, Record

_SKIP_HINT = ("fix or remove that record, or pass skip_bad=True (--skip-bad on the command line) "
              "to skip and count such rows")


class _BadRecord(Exception):
    """Why one row cannot become a record (reported with the row's place)."""


def load_records(path: str | os.PathLike[str], *, skip_bad: bool = False) -> LoadedRecords:
    """Read every record at ``path`` (a ``.parquet`` or ``.jsonl`` file, or a folder of them).

    A malformed record (missing or blank field, unreadable or missing image, unparsable
    line) raises :class:`DataError` naming its file and row. With ``skip_bad=True`` it is
    skipped instead, and counted in ``.skipped`` with its reason in ``.problems``.
    Raises :class:`DataError` too when no usable record is left.
    """
    root = Path(path)
    files = data_files(root)
    loaded = LoadedRecords(records=[], files=[str(f) for f in files])
    for file in files:
        for row in raw_rows(file):
            try:
                loaded.records.append(_record_from_row(row, file.parent))
            except _BadRecord as problem:
                message = f"{row.source}: {problem}"
                if not skip_bad:
                    raise DataError(f"bad record at {message}; {_SKIP_HINT}") from None
                loaded.skipped += 1
                loaded.problems.append(message)
    if not loaded.records:
        if loaded.skipped:
            raise DataError(f"no usable records in {root}: all {loaded.skipped} were malformed "
                            f"(first: {loaded.problems[0]}); fix the data")
        raise DataError(f"{root} holds no records; point the loader at a non-empty data set")
    return loaded


def _record_from_row(row: RawRow, data_folder: Path) -> Record:
    if row.error is not None or row.fields is None:
        raise _BadRecord(row.error or "the row could not be read")
    fields = row.fields
    question = _required_text(fields, "question")
    chosen = _required_text(fields, "chosen")
    rejected = _optional_text(fields, "rejected")
    origin_dataset = _optional_text(fields, "origin_dataset") or ""
    if "image" not in fields:
        raise _BadRecord("the record has no 'image' field")
    image_bytes = _image_bytes(fields["image"], data_folder)
    try:
        return Record(image_bytes, question, chosen, rejected, origin_dataset, source=row.source)
    except ValueError as error:
        raise _BadRecord(str(error)) from None


def _required_text(fields: dict[str, Any], name: str) -> str:
    if name not in fields or fields[name] is None:
        raise _BadRecord(f"the record has no '{name}'")
    value = fields[name]
    if not isinstance(value, str):
        raise _BadRecord(f"'{name}' must be text, not {type(value).__name__}")
    if not value.strip():
        raise _BadRecord(f"'{name}' is empty")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadRecord(f"'{name}' must be text, not {type(value).__name__}")
    return value if value.strip() else None


def _image_bytes(value: Any, data_folder: Path) -> bytes:
    if value is None:
        raise _BadRecord("'image' is empty (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _read_image_file(value, data_folder)
    if isinstance(value, dict):
        stored = value.get("bytes")
        if isinstance(stored, (bytes, bytearray, memoryview)) and len(stored):
            return bytes(stored)
        if isinstance(stored, str) and stored:
            try:
                return base64.b64decode(stored, validate=True)
            except binascii.Error:
                raise _BadRecord("'image.bytes' is text but not base64; in JSON Lines, image bytes "
                                 "must be base64-encoded") from None
        if isinstance(value.get("path"), str) and value["path"]:
            return _read_image_file(value["path"], data_folder)
        raise _BadRecord("'image' has neither bytes nor a path")
    raise _BadRecord(f"'image' must be {{bytes, path}}, bytes or a path, not {type(value).__name__}")


def _read_image_file(name: str, data_folder: Path) -> bytes:
    path = Path(name)
    if not path.is_absolute():
        path = data_folder / path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _BadRecord(f"image file {path} not found (relative image paths are taken from the "
                         f"data file's folder, {data_folder})") from None
    except OSError as error:
        raise _BadRecord(f"cannot read image file {path} ({error.strerror or error})") from None
