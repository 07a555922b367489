"""Rows that cannot become records: why (a short reason code), where, and the tally of those skipped.

Without ``skip_bad`` the first bad row stops loading with one line naming its file, row
(and RLAIF-V ``idx``), the reason and the fix. With it, every bad row is skipped and
counted per reason, so a run over many GB of shards can say at the end what it left out.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from fedvlm.edge.data.records import DataError

# Reason codes, in the order a summary lists them.
BAD_IMAGE = "bad_image"  # null, no bytes nor path, a missing file, or bytes that do not decode
EMPTY_QUESTION = "empty_question"
EMPTY_CHOSEN = "empty_chosen"
MISSING_REJECTED = "missing_rejected"  # only when the objective needs one (DPO)
BAD_ORIGIN_SPLIT = "bad_origin_split"  # origin_split is not a JSON object of text
BAD_FIELD = "bad_field"  # another field of the wrong type
UNPARSABLE_ROW = "unparsable_row"  # a JSON Lines line that is not a JSON object
REASONS: tuple[str, ...] = (BAD_IMAGE, EMPTY_QUESTION, EMPTY_CHOSEN, MISSING_REJECTED, BAD_ORIGIN_SPLIT, BAD_FIELD,
                            UNPARSABLE_ROW)

SKIP_HINT = ("fix or remove that row, or pass --skip-bad (skip_bad=True in Python) to skip and count such rows")


class BadRow(Exception):
    """Why one row cannot become a record: a reason code (``REASONS``) and the detail in words."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def place(source: str, idx: object = None) -> str:
    """``shard.parquet:row 17 (idx 4711)``: the row as a file viewer and the data set's own index name it."""
    return f"{source} (idx {idx})" if idx not in (None, "") else source


@dataclasses.dataclass
class SkippedRows:
    """The bad rows ``skip_bad`` left out: a count per reason, and one message per row."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    problems: list[str] = dataclasses.field(default_factory=list)

    def handle(self, problem: BadRow, where: str, *, skip_bad: bool) -> None:
        """Count ``problem`` at ``where`` if skipping, else raise the one-line :class:`DataError`."""
        message = f"{where}: {problem.detail}"
        if not skip_bad:
            raise DataError(f"bad row at {message} [{problem.reason}]; {SKIP_HINT}")
        self.counts[problem.reason] += 1
        self.problems.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        """Counts in ``REASONS`` order, reasons with none left out."""
        return {reason: self.counts[reason] for reason in REASONS if self.counts[reason]}

    def summary(self) -> str:
        """``skipped 3 bad rows (--skip-bad): 2 bad_image, 1 empty_chosen``, or '' when none."""
        if not self.total:
            return ""
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.by_reason().items())
        return f"skipped {self.total} bad row{'s' if self.total != 1 else ''} (--skip-bad): {reasons}"

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": self.by_reason(), "first": self.problems[:20]}
