"""Streaming over RLAIF-V shards: scan once without the images, load only the rows sampled.

The real data set is many GB of parquet shards, mostly image bytes. :func:`scan_data`
reads every row's text (never the image column) and keeps a :class:`RowRef` per good row:
where it is and what a partition needs (origin_dataset and origin_split's model,
feedback_model and type) — some tens of bytes a row. Partitions and samples are drawn
over these references; :meth:`DataIndex.load` then reads just the chosen rows, one row
group at a time, and keeps each image as its compressed bytes (decoded at batch time).
So what a client holds is bounded by its sample, not by the shards.

Images are checked (decoded once) when a row is loaded: a row that is never sampled is
never decoded, so a bad image there is neither reported nor counted.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from tqdm.auto import tqdm

from fedvlm.edge.data.bad_rows import UNPARSABLE_ROW, BadRow, SkippedRows, place
from fedvlm.edge.data.file_rows import RawRow, data_files, raw_rows, row_source, rows_at
from fedvlm.edge.data.records import DataError, Record
from fedvlm.edge.data.row_checks import record_from_row, row_facts

# What a partition can split by: RowRef fields.
PARTITION_KEYS: tuple[str, ...] = ("origin_dataset", "model", "feedback_model", "type")


class RowRef(NamedTuple):
    """A good row's place (file index into :attr:`DataIndex.files`, row number) and its partition keys."""

    file: int
    number: int
    idx: str
    origin_dataset: str
    model: str
    feedback_model: str
    type: str


@dataclasses.dataclass
class DataIndex:
    """Every usable row of a data set, by reference; :meth:`load` turns a selection into records.

    Attributes:
        root: the path given (a file, a folder or a glob pattern).
        files: the data files, sorted by name.
        rows: one reference per row whose text passed the checks, in file order.
        skipped: bad rows left out (with ``skip_bad``), from the scan and from every ``load``.
        require_rejected: rows without a ``rejected`` answer are bad (preference training).
        skip_bad: skip and count bad rows instead of raising :class:`DataError`.
    """

    root: Path
    files: list[Path]
    rows: list[RowRef]
    skipped: SkippedRows
    require_rejected: bool = False
    skip_bad: bool = False

    def load(self, refs: Sequence[RowRef], *, progress: bool = False) -> list[Record]:
        """The records of ``refs``, in the order given, images read and checked now.

        A row whose image is bad is skipped (and counted in ``skipped``) with ``skip_bad``,
        so fewer records than refs can come back; without it :class:`DataError` names it.
        """
        loaded = self.load_by_place(refs, progress=progress)
        return [loaded[ref.file, ref.number] for ref in refs if (ref.file, ref.number) in loaded]

    def load_by_place(self, refs: Iterable[RowRef], *, progress: bool = False) -> dict[tuple[int, int], Record]:
        """Like :meth:`load`, keyed by (file, number): one pass over the files for many clients' rows."""
        by_file: dict[int, list[int]] = defaultdict(list)
        for ref in refs:
            by_file[ref.file].append(ref.number)
        loaded: dict[tuple[int, int], Record] = {}
        bar = tqdm(total=sum(map(len, by_file.values())), unit="row", desc="loading rows", disable=not progress,
                   leave=False)
        for file_index in sorted(by_file):
            file = self.files[file_index]
            for row in rows_at(file, by_file[file_index]):
                record = self._record(row, file)
                if record is not None:
                    loaded[file_index, row.number] = record
                bar.update()
        bar.close()
        return loaded

    def fresh_tally(self) -> "DataIndex":
        """The same index with its own copy of ``skipped``: loads through it count apart (one per seed)."""
        tally = SkippedRows(Counter(self.skipped.counts), list(self.skipped.problems))
        return dataclasses.replace(self, skipped=tally)

    def _record(self, row: RawRow, file: Path) -> Record | None:
        fields = row.fields or {}
        try:
            if row.fields is None:
                raise BadRow(UNPARSABLE_ROW, row.error or "the row could not be read")
            facts = row_facts(fields, require_rejected=self.require_rejected)
            return record_from_row(fields, facts, file.parent, row.source)
        except BadRow as problem:
            self.skipped.handle(problem, place(row.source, fields.get("idx")), skip_bad=self.skip_bad)
            return None

    def source_of(self, ref: RowRef) -> str:
        return place(row_source(self.files[ref.file], ref.number), ref.idx)


def scan_data(path: str | Path, *, require_rejected: bool = False, skip_bad: bool = False,
              progress: bool = False) -> DataIndex:
    """Check every row's text at ``path`` (a ``.parquet`` / ``.jsonl`` file, a folder of them or a
    glob pattern) without reading parquet images, and index the good rows.

    A bad row raises :class:`DataError` naming its file, row and idx, unless ``skip_bad``
    (then it is counted per reason). Raises :class:`DataError` too when no usable row is left.
    """
    root = Path(path)
    files = data_files(root)
    index = DataIndex(root, files, [], SkippedRows(), require_rejected, skip_bad)
    for file_index, file in enumerate(tqdm(files, unit="file", desc="scanning data", disable=not progress)):
        for row in raw_rows(file, with_images=False):
            ref = _ref(row, file_index, index)
            if ref is not None:
                index.rows.append(ref)
    if not index.rows:
        if index.skipped.total:
            raise DataError(f"no usable records in {root}: all {index.skipped.total} were malformed "
                            f"(first: {index.skipped.problems[0]}); fix the data")
        raise DataError(f"{root} holds no records; point the loader at a non-empty data set")
    return index


def _ref(row: RawRow, file_index: int, index: DataIndex) -> RowRef | None:
    fields = row.fields or {}
    try:
        if row.fields is None:
            raise BadRow(UNPARSABLE_ROW, row.error or "the row could not be read")
        facts = row_facts(fields, require_rejected=index.require_rejected)
    except BadRow as problem:
        index.skipped.handle(problem, place(row.source, fields.get("idx")), skip_bad=index.skip_bad)
        return None
    # Interned: a handful of distinct sources over ~100k rows, one string object each.
    return RowRef(file_index, row.number, facts.idx, sys.intern(facts.origin_dataset), sys.intern(facts.model),
                  sys.intern(facts.feedback_model), sys.intern(facts.type))


def refs_in_file_order(refs: Iterable[RowRef]) -> list[RowRef]:
    return sorted(refs, key=lambda ref: (ref.file, ref.number))
