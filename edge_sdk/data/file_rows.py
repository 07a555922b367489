"""Raw rows out of RLAIF-V data files (parquet or JSON Lines), each tagged with its place.

This layer only knows file formats; what makes a row a valid record is decided in
:mod:`fedvlm.edge.data.row_checks`. A row that cannot even be parsed comes out with an
``error`` instead of fields, so the caller can report or skip it like any other bad row.

Parquet is streamed: :func:`raw_rows` reads record batches (optionally without the image
column, which is most of a shard's bytes), and :func:`rows_at` reads only the row groups
that hold the wanted rows, so memory is bounded by a row group, never by the shard.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from fedvlm.edge.data.records import DataError

PARQUET_SUFFIX = ".parquet"
JSONL_SUFFIX = ".jsonl"
DATA_SUFFIXES = (PARQUET_SUFFIX, JSONL_SUFFIX)

# Columns a parquet file must have; optional ones (rejected, origin_dataset, ...) may be absent.
REQUIRED_COLUMNS = ("image", "question", "chosen")

# Parquet rows are read in batches so a large file never sits in memory as Python objects.
_PARQUET_BATCH_ROWS = 256
# Arrow's reader threads each keep their own allocator caches: measured here, a single reader
# thread keeps the peak flat after a few row groups (about 75 MB above the interpreter's, from
# 8 to 78 row groups of 4 MB), threads let it climb to 110 MB. Reading is bound by I/O and
# copying one bytes column, so one thread costs little time.
_READER_THREADS = False


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One row as stored: ``fields`` (column -> value), or ``error`` when it could not be parsed."""

    source: str  # "data/client_00.parquet:row 17" or "data/train.jsonl:line 18"
    fields: dict[str, Any] | None
    error: str | None = None
    number: int = 0  # the row (parquet, from 0) or line (JSON Lines, from 1) that ``source`` names


def row_source(file: Path, number: int) -> str:
    """How a row is named in messages: parquet rows from 0 (as ``datasets`` indexes them),
    JSON Lines lines from 1 (as editors show them)."""
    return f"{file}:row {number}" if file.suffix == PARQUET_SUFFIX else f"{file}:line {number}"


def data_files(path: Path) -> list[Path]:
    """The data files at ``path``: the file itself, a directory's ``.parquet`` and ``.jsonl``
    files, or the files a glob pattern (``shards/train-*.parquet``) matches; sorted by name,
    so the record order is the same on every device."""
    if not path.exists() and glob.has_magic(str(path)):
        matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix in DATA_SUFFIXES)
        if not matches:
            raise DataError(f"no .parquet or .jsonl file matches {path}; check the pattern")
        return matches
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


def raw_rows(file: Path, *, with_images: bool = True) -> Iterator[RawRow]:
    """The rows of one data file, in order; ``with_images=False`` leaves parquet's image column
    unread (its rows then have no ``image`` field)."""
    if file.suffix == PARQUET_SUFFIX:
        return _parquet_rows(file, with_images)
    return _jsonl_rows(file, None)


def rows_at(file: Path, numbers: Iterable[int]) -> Iterator[RawRow]:
    """The rows numbered ``numbers`` (as :attr:`RawRow.number`), with every field, in file order."""
    wanted = sorted(set(numbers))
    if not wanted:
        return iter(())
    if file.suffix == PARQUET_SUFFIX:
        return _parquet_rows_at(file, wanted)
    return _jsonl_rows(file, set(wanted))


def _open_parquet(file: Path):
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
    return parquet


def _parquet_rows(file: Path, with_images: bool) -> Iterator[RawRow]:
    parquet = _open_parquet(file)
    columns = None if with_images else [c for c in parquet.schema_arrow.names if c != "image"]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns,
                                          use_threads=_READER_THREADS):
            for fields in batch.to_pylist():
                yield RawRow(row_source(file, row), fields, number=row)
                row += 1
    except OSError as error:
        raise DataError(f"{file} is damaged after row {row} ({error}); re-copy the file") from None


def _parquet_rows_at(file: Path, wanted: list[int]) -> Iterator[RawRow]:
    parquet = _open_parquet(file)
    starts = [0]
    for group in range(parquet.metadata.num_row_groups):
        starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
    position = 0
    while position < len(wanted):
        group = bisect.bisect_right(starts, wanted[position]) - 1
        if group >= len(starts) - 1:
            raise DataError(f"{file} has {starts[-1]} rows, not row {wanted[position]}; it changed while being read")
        end = bisect.bisect_left(wanted, starts[group + 1], position)
        try:  # one row group in memory at a time: its wanted rows are taken, the rest let go
            table = parquet.read_row_group(group, use_threads=_READER_THREADS)
        except OSError as error:
            raise DataError(f"{file} is damaged in row group {group} ({error}); re-copy the file") from None
        local = [number - starts[group] for number in wanted[position:end]]
        for number, fields in zip(wanted[position:end], table.take(local).to_pylist()):
            yield RawRow(row_source(file, number), fields, number=number)
        del table
        position = end


def _jsonl_rows(file: Path, wanted: set[int] | None) -> Iterator[RawRow]:
    with open(file, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip() or (wanted is not None and number not in wanted):
                continue  # blank lines (a trailing newline, say) are not records
            source = row_source(file, number)
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                yield RawRow(source, None, f"the line is not valid JSON ({error.msg} at column {error.colno})", number)
                continue
            if not isinstance(fields, dict):
                yield RawRow(source, None, f"the line holds a JSON {type(fields).__name__}, not an object", number)
                continue
            yield RawRow(source, fields, number=number)
