"""What makes a raw row a valid RLAIF-V record, checked in two steps.

:func:`row_facts` checks the text fields and parses ``origin_split`` (cheap: it never
touches the image, so a whole shard can be scanned with the image column left on disk);
:func:`record_from_row` reads and checks the image of a row that was actually sampled.

Accepted ``image`` values, as RLAIF-V and Hugging Face ``datasets`` store them and as people
write them by hand:

- a struct / object ``{"bytes": ..., "path": ...}`` (the HF ``Image`` feature): the bytes
  if present, else the path; in JSON Lines the bytes are base64 text;
- raw bytes (a parquet ``binary`` column);
- a path string. Relative paths are relative to the data file's folder, so a data set
  folder can be moved or copied to a device as a whole.

``origin_split`` is RLAIF-V's JSON text ``{"model": ..., "feedback_model": ..., "type": ...}``
(the answering model, the model that judged the pair, the kind of question); empty or
null means unknown, anything else that is not such an object is a bad row.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any, NamedTuple

from fedvlm.edge.data.bad_rows import (
    BAD_FIELD,
    BAD_IMAGE,
    BAD_ORIGIN_SPLIT,
    EMPTY_CHOSEN,
    EMPTY_QUESTION,
    MISSING_REJECTED,
    BadRow,
)
from fedvlm.edge.data.records import Record

ORIGIN_SPLIT_KEYS = ("model", "feedback_model", "type")


class RowFacts(NamedTuple):
    """A row's text fields, checked; what partitions and objectives need before any image is read."""

    question: str
    chosen: str
    rejected: str | None
    origin_dataset: str
    model: str
    feedback_model: str
    type: str
    idx: str


def row_facts(fields: dict[str, Any], *, require_rejected: bool = False) -> RowFacts:
    """The checked text of a row, or :class:`BadRow` saying what is wrong with it."""
    question = _required_text(fields, "question", EMPTY_QUESTION)
    chosen = _required_text(fields, "chosen", EMPTY_CHOSEN)
    rejected = _optional_text(fields, "rejected")
    if require_rejected and rejected is None:
        raise BadRow(MISSING_REJECTED, "'rejected' is missing or empty, and preference training (DPO) needs one")
    origin_dataset = _optional_text(fields, "origin_dataset") or ""
    model, feedback_model, kind = parse_origin_split(fields.get("origin_split"))
    idx = fields.get("idx")
    return RowFacts(question, chosen, rejected, origin_dataset, model, feedback_model, kind,
                    "" if idx is None else str(idx))


def parse_origin_split(value: Any) -> tuple[str, str, str]:
    """(model, feedback_model, type) from RLAIF-V's ``origin_split`` JSON text; '' for what it leaves out."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "", "", ""
    if isinstance(value, dict):  # JSON Lines written by hand may hold the object itself
        parsed: Any = value
    elif isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise BadRow(BAD_ORIGIN_SPLIT, f"'origin_split' is not valid JSON ({error.msg} at column {error.colno}): "
                                           f"{value[:60]!r}") from None
    else:
        raise BadRow(BAD_ORIGIN_SPLIT, f"'origin_split' must be JSON text, not {type(value).__name__}")
    if not isinstance(parsed, dict):
        raise BadRow(BAD_ORIGIN_SPLIT, f"'origin_split' holds a JSON {type(parsed).__name__}, not an object with "
                                       "model, feedback_model and type")
    values = []
    for key in ORIGIN_SPLIT_KEYS:
        item = parsed.get(key)
        if item is not None and not isinstance(item, (str, int, float)):
            raise BadRow(BAD_ORIGIN_SPLIT, f"'origin_split' field {key!r} must be text, not {type(item).__name__}")
        values.append("" if item is None else str(item))
    return values[0], values[1], values[2]


def record_from_row(fields: dict[str, Any], facts: RowFacts, data_folder: Path, source: str) -> Record:
    """The record of a checked row: its image is read and decoded once here (then kept as bytes)."""
    if "image" not in fields:
        raise BadRow(BAD_IMAGE, "the record has no 'image' field")
    image_bytes = _image_bytes(fields["image"], data_folder)
    try:
        return Record(image_bytes, facts.question, facts.chosen, facts.rejected, facts.origin_dataset, source=source,
                      model=facts.model, feedback_model=facts.feedback_model, type=facts.type)
    except ValueError as error:
        raise BadRow(BAD_IMAGE, str(error)) from None


def _required_text(fields: dict[str, Any], name: str, reason: str) -> str:
    if name not in fields or fields[name] is None:
        raise BadRow(reason, f"the record has no '{name}'")
    value = fields[name]
    if not isinstance(value, str):
        raise BadRow(reason, f"'{name}' must be text, not {type(value).__name__}")
    if not value.strip():
        raise BadRow(reason, f"'{name}' is empty")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(BAD_FIELD, f"'{name}' must be text, not {type(value).__name__}")
    return value if value.strip() else None


def _image_bytes(value: Any, data_folder: Path) -> bytes:
    if value is None:
        raise BadRow(BAD_IMAGE, "'image' is empty (null)")
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
                raise BadRow(BAD_IMAGE, "'image.bytes' is text but not base64; in JSON Lines, image bytes "
                                        "must be base64-encoded") from None
        if isinstance(value.get("path"), str) and value["path"]:
            return _read_image_file(value["path"], data_folder)
        raise BadRow(BAD_IMAGE, "'image' has neither bytes nor a path")
    raise BadRow(BAD_IMAGE, f"'image' must be {{bytes, path}}, bytes or a path, not {type(value).__name__}")


def _read_image_file(name: str, data_folder: Path) -> bytes:
    path = Path(name)
    if not path.is_absolute():
        path = data_folder / path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadRow(BAD_IMAGE, f"image file {path} not found (relative image paths are taken from the "
                                f"data file's folder, {data_folder})") from None
    except OSError as error:
        raise BadRow(BAD_IMAGE, f"cannot read image file {path} ({error.strerror or error})") from None
