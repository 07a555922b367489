"""Non-IID splits of RLAIF-V rows into clients, seeded, and the table that shows them.

A :class:`PartitionSpec` (``--partition``) is one of:

- ``origin_dataset`` (the paper's), ``model``, ``feedback_model`` or ``type`` (the last three
  from ``origin_split``): every value of that key goes whole to one client, largest first to
  the client holding fewest rows, so clients differ in source and stay near in size;
  needs at least as many values as clients;
- ``dirichlet:ALPHA[:KEY]``: per value of KEY (default ``origin_dataset``), client shares
  drawn from Dirichlet(ALPHA), the usual label-skew split (smaller ALPHA, more skew);
- ``iid``: a seeded shuffle dealt evenly.

The split works on :class:`~fedvlm.edge.data.row_index.RowRef` (or anything with the
key attributes, e.g. records), so no image is read to draw it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Sequence, TypeVar

import numpy as np

from fedvlm.edge.data.row_index import PARTITION_KEYS
from fedvlm.shared.usage_error import UsageError

Row = TypeVar("Row")
UNNAMED = "unnamed"  # how a row with no value for the key is shown and grouped
DEFAULT_KEY = "origin_dataset"


@dataclasses.dataclass(frozen=True)
class PartitionSpec:
    """How rows are split into clients: ``kind`` is ``by_key``, ``dirichlet`` or ``iid``."""

    kind: str
    key: str = DEFAULT_KEY
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        keys = ", ".join(PARTITION_KEYS)
        usage = (f"use one of {keys} (each value whole to one client), iid, or dirichlet:ALPHA[:KEY] with ALPHA a "
                 f"positive number and KEY one of {keys} (e.g. dirichlet:0.5 or dirichlet:0.3:model; smaller "
                 "ALPHA is more skewed)")
        if text in PARTITION_KEYS:
            return cls("by_key", text)
        if text == "iid":
            return cls("iid")
        kind, _, rest = text.partition(":")
        if kind != "dirichlet":
            raise UsageError(f"bad --partition {text!r}: {usage}")
        value, _, key = rest.partition(":")
        try:
            alpha = float(value)
        except ValueError:
            raise UsageError(f"bad --partition {text!r}: {value!r} is not a number; {usage}") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise UsageError(f"bad --partition {text!r}: ALPHA must be positive; {usage}")
        if key and key not in PARTITION_KEYS:
            raise UsageError(f"bad --partition {text!r}: {key!r} is not a key to split by; {usage}")
        return cls("dirichlet", key or DEFAULT_KEY, alpha)

    def __str__(self) -> str:
        if self.kind == "iid":
            return "iid"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}" + (f":{self.key}" if self.key != DEFAULT_KEY else "")
        return self.key


def key_value(row: object, key: str) -> str:
    return getattr(row, key) or UNNAMED


def partition_rows(rows: Sequence[Row], spec: PartitionSpec, n_clients: int,
                   rng: np.random.Generator) -> list[list[Row]]:
    """``rows`` split into ``n_clients`` lists by ``spec``; a function of ``rng``'s state.

    Each client's rows keep the order they had in ``rows``.
    """
    groups: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        groups.setdefault(key_value(row, spec.key), []).append(position)
    if spec.kind == "iid":
        order = rng.permutation(len(rows))
        shares = [sorted(order[k::n_clients]) for k in range(n_clients)]
    elif spec.kind == "by_key":
        shares = _whole_groups(groups, spec.key, n_clients)
    else:
        shares = [[] for _ in range(n_clients)]
        for value in sorted(groups):
            group = groups[value]
            order = rng.permutation(len(group))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, spec.alpha))) * len(group)).astype(int)[:-1]
            for client, part in enumerate(np.split(order, cuts)):
                shares[client].extend(group[i] for i in part)
        shares = [sorted(share) for share in shares]
    return [[rows[i] for i in share] for share in shares]


def _whole_groups(groups: dict[str, list[int]], key: str, n_clients: int) -> list[list[int]]:
    if len(groups) < n_clients:
        values = sorted(groups)
        raise UsageError(f"--partition {key} needs at least one source per client: the data has {len(values)} "
                         f"{key} value(s) ({', '.join(values[:5])}{', ...' if len(values) > 5 else ''}) for "
                         f"{n_clients} clients; use fewer --clients, another key, or --partition "
                         f"dirichlet:ALPHA{'' if key == DEFAULT_KEY else ':' + key} / iid")
    shares: list[list[int]] = [[] for _ in range(n_clients)]
    # Largest first to the smallest client: sizes stay close; ties by name, so the split is fixed.
    for value in sorted(groups, key=lambda v: (-len(groups[v]), v)):
        smallest = min(range(n_clients), key=lambda k: (len(shares[k]), k))
        shares[smallest].extend(groups[value])
    return [sorted(share) for share in shares]


def sample_rows(rows: Sequence[Row], limit: int | None, rng: np.random.Generator) -> list[Row]:
    """At most ``limit`` of ``rows`` drawn without replacement, kept in their order (all when None)."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    return [rows[i] for i in sorted(rng.choice(len(rows), limit, replace=False))]


def client_shares(rows: Sequence[Row], spec: PartitionSpec, n_clients: int, rng: np.random.Generator, *,
                  max_examples: int | None = None, max_per_client: int | None = None) -> list[list[Row]]:
    """What each of ``n_clients`` clients holds: at most ``max_examples`` rows drawn, split by
    ``spec``, then at most ``max_per_client`` kept per client; all drawn from ``rng``, so a
    simulation and a device that use the same seed get the same shares."""
    drawn = sample_rows(rows, max_examples, rng)
    return [sample_rows(share, max_per_client, rng) for share in partition_rows(drawn, spec, n_clients, rng)]


@dataclasses.dataclass(frozen=True)
class PartitionTable:
    """Client × source counts of a split: what each client holds, by the key it was split on."""

    key: str
    values: tuple[str, ...]
    clients: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]  # counts[client][value]

    @classmethod
    def of(cls, shares: Sequence[Sequence[object]], key: str, client_ids: Sequence[str]) -> "PartitionTable":
        tallies = [Counter(key_value(row, key) for row in share) for share in shares]
        values = tuple(sorted(set().union(*tallies)))
        return cls(key, values, tuple(client_ids),
                   tuple(tuple(tally[value] for value in values) for tally in tallies))

    def markdown(self) -> str:
        header = f"| client | {' | '.join(self.values)} | total |"
        rule = "| --- |" + " ---: |" * (len(self.values) + 1)
        rows = [f"| {client} | {' | '.join(str(c) for c in counts)} | {sum(counts)} |"
                for client, counts in zip(self.clients, self.counts)]
        totals = [sum(column) for column in zip(*self.counts)] if self.counts else []
        rows.append(f"| all | {' | '.join(map(str, totals))} | {sum(totals)} |")
        return "\n".join([f"rows per client by {self.key}:", "", header, rule, *rows])

    def to_dict(self) -> dict:
        return {"key": self.key, "clients": {client: {value: count for value, count in zip(self.values, counts)
                                                      if count}
                                             for client, counts in zip(self.clients, self.counts)}}
