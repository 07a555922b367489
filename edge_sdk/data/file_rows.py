"""Raw rows out of RLAIF-V data files (parquet or JSON Lines), each tagged with its place.

This layer only knows file formats; what makes a row a valid record is decided in
:mod:`fedvlm.edge.data.reading`. A row that cannot even be parsed comes out with an
``error`` instead of fields, so the caller can report or skip it like any other bad row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

from fedvlm.edge.data.records import DataError

PARQUET_SUFFIX = ".parquet"
JSONL_SUFFIX = ".jsonl"
DATA_SUFFIXES = (PARQUET_SUFFIX, JSONL_SUFFIX)

# Columns a parquet file must have; optional ones (rejected, origin_dataset, ...) may be absent.
REQUIRED_COLUMNS = ("image", "question", "chosen")

# Parquet rows are read in batches so a large file never sits in memory as Python objects.
_PARQUET_BATCH_ROWS = 256


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One row as stored: ``fields`` (column -> value), or ``error`` when it could not be parsed."""

    source: str  # "data/client_00.parquet:row 17" or "data/train.jsonl:line 18"
    fields: dict[str, Any] | None
    error: str | None = None


def data_files(path: Path) -> list[Path]:
    """The data files at ``path``: the file itself, or a directory's ``.parquet`` and
    ``.jsonl`` files sorted by name (so the record order is the same on every device)."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass a .parquet or .jsonl file or a folder of them")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"folder {path} holds no .parquet or .jsonl files; put the data files there "
                            "or pass one file")
        return files
    if path.suffix not in DATA_SUFFIXES:
        raise DataError(f"{path} is not a data file this loader reads; use RLAIF-V .parquet or "
                        ".jsonl (one JSON object per line)")
    return [path]


def raw_rows(file: Path) -> Iterator[RawRow]:
    """The rows of one data file, in order."""
    if file.suffix == PARQUET_SUFFIX:
        return _parquet_rows(file)
    return _jsonl_rows(file)


def _parquet_rows(file: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"cannot read {file} as parquet ({type(error).__name__}: {error}); "
                        "check that the file is complete and really parquet") from None
    columns = parquet.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{file} has no {', '.join(repr(c) for c in missing)} column "
                        f"(it has: {', '.join(columns)}); RLAIF-V data needs columns "
                        f"{', '.join(REQUIRED_COLUMNS)}")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for fields in batch.to_pylist():
                yield RawRow(f"{file}:row {row}", fields)
                row += 1
    except OSError as error:
        raise DataError(f"{file} is damaged after row {row} ({error}); re-copy the file") from None


def _jsonl_rows(file: Path) -> Iterator[RawRow]:
    with open(file, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not records
            source = f"{file}:line {number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                yield RawRow(source, None, f"the line is not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(fields, dict):
                yield RawRow(source, None, f"the line holds a JSON {type(fields).__name__}, not an object")
                continue
            yield RawRow(source, fields)
