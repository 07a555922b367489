"""What a ``--data`` simulation says about its data: the client x source table, bad rows skipped.

Each seed's split is recorded in ``<out>/partition.json`` when it is drawn (so a resumed
simulation still reports the splits of seeds finished earlier), printed on the console, and
added to ``results.json`` (``data``) and ``results.md`` by the reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedvlm.shared.durable_files import write_durably

PARTITION_FILE = "partition.json"


def record_split(out: Path, seed: int, summary: dict) -> None:
    """Add one seed's split to ``partition.json``."""
    splits = load_splits(out) or {}
    splits[str(seed)] = summary
    write_durably(out / PARTITION_FILE, json.dumps(splits, indent=2).encode())


def load_splits(out: Path) -> dict | None:
    """seed -> split summary, or None for a simulation of a built-in scenario."""
    path = out / PARTITION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def console_text(seed: int, table_markdown: str, summary: dict) -> str:
    lines = [f"seed {seed}: {summary['rows_kept']} of {summary['rows_usable']} usable rows in {summary['files']} "
             f"file(s), split by {summary['partition']}", "", table_markdown]
    skipped = _skipped_line(summary["skipped"])
    return "\n".join(lines + ([skipped] if skipped else [])) + "\n"


def _skipped_line(skipped: dict) -> str:
    if not skipped["total"]:
        return ""
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped["by_reason"].items())
    return f"skipped {skipped['total']} bad row(s) (--skip-bad): {reasons}"


def markdown_section(splits: dict | None) -> str:
    """The data section of ``results.md``: per seed, the client x source table and the rows skipped."""
    if not splits:
        return ""
    lines = ["", "## Data", ""]
    for seed, summary in splits.items():
        table = summary["table"]
        values = sorted({value for counts in table["clients"].values() for value in counts})
        lines += [f"Seed {seed}: {summary['rows_kept']} of {summary['rows_usable']} usable rows "
                  f"({summary['files']} file(s)), split by {summary['partition']}; rows per client by {table['key']}:",
                  "", f"| client | {' | '.join(values)} | total |", "| --- |" + " ---: |" * (len(values) + 1)]
        for client, counts in table["clients"].items():
            lines.append(f"| {client} | {' | '.join(str(counts.get(v, 0)) for v in values)} | "
                         f"{sum(counts.values())} |")
        skipped = _skipped_line(summary["skipped"])
        lines += ["", skipped or "No bad rows skipped.", ""]
    return "\n".join(lines)
