"""A hub worker's state in the hub database, and the coordinator's merge of the workers' sums.

``WorkerLedger`` is what ``UpdateIntake`` uses as its store in a worker: each group commit
puts the batch's receipts into the hub's receipts table (its key counts a client once
across workers) together with the worker's running partial sum, in one transaction.
``RoundMirror`` is the round as the coordinator committed it, read back. The coordinator
seals a round and merges the partial sums with ``merge_worker_partials``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import HubError
from .partial_sums import decode_aggregate
from .rounds import OpenRound, RoundLifecycle, RoundPolicy
from .store import HubStore, Receipt

__all__ = ["WorkerLedger", "RoundMirror", "merge_worker_partials"]


class WorkerLedger:
    """What ``UpdateIntake`` uses as its store in a worker.

    Clients, secrets, rejections and receipt lookups are the hub's; the running sum the
    intake commits with each batch is this worker's partial
    (``HubStore.commit_worker_batch``), and the receipts it rebuilds that sum against are
    this worker's.
    """

    def __init__(self, store: HubStore, name: str) -> None:
        self._store = store
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._store, attribute)

    def commit_accepted(self, round_number: int, receipts: Iterable[Receipt], aggregate: bytes, count: int,
                        now: float, pins: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self._store.commit_worker_batch(self.name, round_number, receipts, aggregate, count, now, pins=pins)

    def round_aggregate(self, round_number: int) -> tuple[bytes, int] | None:
        return self._store.worker_partial(round_number, self.name)

    def receipts(self, round_number: int) -> list[Receipt]:
        return self._store.worker_receipts(round_number, self.name)


class RoundMirror:
    """The round as the coordinator committed it to the hub database, read back.

    A worker never opens or closes rounds; it judges updates against this view, refreshed
    a few times a second (and at once for an update that names a newer round).
    """

    def __init__(self, store: HubStore, policy: RoundPolicy) -> None:
        self._store = store
        self._policy = policy
        self.lifecycle = RoundLifecycle(policy)
        self._key: tuple | None = None

    def refresh(self) -> bool:
        """Read the latest round again; True if it changed."""
        latest = self._store.latest_round()
        completed = self._store.completed_rounds()
        key = None if latest is None else (latest.round, latest.attempt, latest.closed_at, latest.outcome,
                                           latest.deadline, completed)  # fmt: skip
        if key == self._key:
            return False
        self._key = key
        if latest is None or latest.outcome == "aggregated":
            self.lifecycle = RoundLifecycle(self._policy, completed_rounds=completed)
        elif not latest.is_open:
            self.lifecycle = RoundLifecycle(self._policy, completed_rounds=completed, next_attempt=latest.attempt + 1)
        else:
            current = OpenRound(number=latest.round, attempt=latest.attempt, selected=latest.selected,
                                quorum=latest.quorum, opened_at=latest.opened_at, deadline=latest.deadline)
            self.lifecycle = RoundLifecycle(self._policy, completed_rounds=completed, current=current)
        return True


def merge_worker_partials(strategy: Any, store: HubStore, round_number: int, now: float) -> Any:
    """The coordinator's side: seal the round and merge every worker's partial sum of it.

    ``strategy`` is the one updates were added with (norm bounding included). Raises
    HubError if the partials do not hold exactly the round's receipts (they are committed
    together, so that is a bug or a damaged database, never a race)."""
    partials, receipts = store.seal_worker_partials(round_number, now)
    merged = None
    counted = 0
    for worker, state, count in partials:
        partial = strategy.aggregator_from_state(decode_aggregate(state))
        if partial.count != count:
            raise HubError(f"the partial sum of {worker} in round {round_number} holds {partial.count} update(s) but "
                           f"was committed as {count}")  # fmt: skip
        if merged is None:
            merged = partial
        else:
            merged.merge(partial)
        counted += count
    if counted != receipts:
        raise HubError(f"the workers' partial sums of round {round_number} hold {counted} update(s), the round has "
                       f"{receipts} receipt(s)")  # fmt: skip
    return merged
