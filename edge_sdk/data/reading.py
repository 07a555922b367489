"""Load RLAIF-V records from parquet, JSON Lines, a folder of them or a glob of shards.

What a valid row is (and which image values are accepted) is in
:mod:`fedvlm.edge.data.row_checks`; streaming over shards in :mod:`fedvlm.edge.data.row_index`.
Required per record: ``image``, a non-blank ``question`` and a non-blank ``chosen``;
``rejected`` too with ``require_rejected`` (preference training). Rows are numbered from 0
in parquet (as ``datasets`` indexes them) and lines from 1 in JSON Lines (as editors show them).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from fedvlm.edge.data.records import DataError, LoadedRecords
from fedvlm.edge.data.row_index import DataIndex, refs_in_file_order, scan_data

if TYPE_CHECKING:
    from fedvlm.edge.data.partitioning import PartitionSpec


def load_records(path: str | os.PathLike[str], *, skip_bad: bool = False, require_rejected: bool = False,
                 max_examples: int | None = None, seed: int = 0) -> LoadedRecords:
    """Read the records at ``path`` (a ``.parquet`` or ``.jsonl`` file, a folder or a glob of them).

    ``max_examples``: at most this many, drawn at random (seeded by ``seed``) from every
    usable row and kept in file order; only the drawn rows' images are read.
    A malformed record (missing or blank field, unreadable or missing image, unparsable
    line, broken ``origin_split``, no ``rejected`` under ``require_rejected``) raises
    :class:`DataError` naming its file and row. With ``skip_bad=True`` it is skipped
    instead, counted in ``.skipped`` / ``.skipped_by_reason``, its message in ``.problems``.
    Raises :class:`DataError` too when no usable record is left.
    """
    index = scan_data(path, require_rejected=require_rejected, skip_bad=skip_bad)
    refs = index.rows
    if max_examples is not None and max_examples < len(refs):
        chosen = np.random.default_rng([seed, 41]).choice(len(refs), max_examples, replace=False)
        refs = refs_in_file_order(refs[i] for i in chosen)
    loaded = _loaded(index, index.load(refs))
    if not loaded.records:
        raise DataError(f"no usable records in {path}: all {loaded.skipped} loaded were malformed "
                        f"(first: {loaded.problems[0]}); fix the data")
    return loaded


def load_client_share(path: str | os.PathLike[str], client: int, clients: int, partition: "PartitionSpec", *,
                      seed: int = 0, max_examples: int | None = None, max_per_client: int | None = None,
                      skip_bad: bool = False, require_rejected: bool = False) -> LoadedRecords:
    """Client ``client``'s share (of ``clients``) of the data set at ``path``, split by ``partition``.

    For a device that reads shared shards (all of RLAIF-V, say) but should train on its own
    non-IID part: only that part's images are read. Shares are drawn as ``fedvlm simulate``
    draws them for the same seed (:func:`~fedvlm.edge.data.partitioning.client_shares`).
    """
    from fedvlm.edge.data.partitioning import client_shares

    if not 0 <= client < clients:
        raise DataError(f"client share {client} of {clients} does not exist: shares are numbered 0 to {clients - 1}")
    index = scan_data(path, require_rejected=require_rejected, skip_bad=skip_bad)
    shares = client_shares(index.rows, partition, clients, np.random.default_rng([seed, 17]),
                           max_examples=max_examples, max_per_client=max_per_client)
    loaded = _loaded(index, index.load(shares[client]))
    if not loaded.records:
        raise DataError(f"client share {client} of {clients} of {path} split by {partition} is empty; "
                        "use another partition, fewer clients or more data")
    return loaded


def _loaded(index: DataIndex, records: list) -> LoadedRecords:
    return LoadedRecords(records=records, skipped=index.skipped.total,
                         problems=sorted(index.skipped.problems, key=_place_order),
                         files=[str(f) for f in index.files], skipped_by_reason=index.skipped.by_reason())


def _place_order(problem: str) -> tuple[str, int]:
    """Problems sorted as the rows lie in the files (the scan finds text problems before image ones)."""
    where = problem.split(": ", 1)[0]
    file, _, rest = where.rpartition(":")
    number = rest.split()[1] if len(rest.split()) > 1 else "0"
    return file, int(number) if number.isdigit() else 0
