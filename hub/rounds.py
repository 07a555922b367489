"""The round lifecycle as plain logic: no MQTT, no files, a clock passed in.

One round goes::

    waiting ──(enough clients online)──▶ collecting ──(all selected answered)──▶ aggregate
                                             │
                                             └──(deadline)──▶ aggregate if the quorum holds,
                                                              else retry: a new attempt

A retry keeps the round number and the updates already accepted for it: they were
trained on the same global version, and a client that was acknowledged does not train
that round again. The new attempt selects those clients plus a fresh sample of the
online ones, with a new deadline. The hub service persists every transition (store.py)
and publishes it (HubState); this module only decides.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import random
from collections.abc import Collection, Iterable

__all__ = ["RoundPolicy", "OpenRound", "Outcome", "RoundLifecycle", "LifecyclePhase"]


@dataclasses.dataclass(frozen=True)
class RoundPolicy:
    """How rounds are sized and timed (the round-related fields of HubConfig).

    Attributes:
        min_clients: online clients needed before a round opens.
        fraction: share of the online clients to select (like Flower's ``fraction_train``).
        clients_per_round: at most this many clients per round (None: no cap), sampled from
            those online; at least ``clients_needed()`` are selected whatever the cap.
        quorum: accepted updates needed at the deadline; None means half the selected,
            rounded up (at least 1).
        round_timeout_s: seconds from opening to deadline.
        seed: seed of the selection; each (round, attempt) draws from its own stream.
        rounds: rounds to complete; None for no end.
    """

    min_clients: int = 2
    fraction: float = 1.0
    quorum: int | None = None
    round_timeout_s: float = 600.0
    seed: int = 0
    rounds: int | None = None
    clients_per_round: int | None = None

    def clients_needed(self) -> int:
        """Clients that must be available before a round opens: a round must be able to reach its quorum."""
        return max(self.min_clients, self.quorum or 1)

    def selection_size(self, available: int) -> int:
        wanted = math.ceil(self.fraction * available)
        if self.clients_per_round is not None:
            wanted = min(wanted, self.clients_per_round)
        return min(available, max(self.clients_needed(), wanted))

    def quorum_for(self, selected: int) -> int:
        if self.quorum is not None:
            return min(self.quorum, selected)
        return max(1, math.ceil(0.5 * selected))

    def select(self, online: Collection[str], round_number: int, attempt: int,
               answered: Collection[str] = ()) -> tuple[str, ...]:  # fmt: skip
        """The clients of one attempt: those that already answered this round, plus a
        seeded sample of the other online clients up to the selection size. Sorted."""
        answered = set(answered)
        candidates = sorted(set(online) - answered)
        size = self.selection_size(len(candidates) + len(answered))
        # A string seed gives a stable stream across Python versions and processes.
        rng = random.Random(f"fedvlm-selection/{self.seed}/{round_number}/{attempt}")
        picked = rng.sample(candidates, max(0, min(len(candidates), size - len(answered))))
        return tuple(sorted(answered | set(picked)))

    def is_finished(self, completed_rounds: int) -> bool:
        return self.rounds is not None and completed_rounds >= self.rounds


class Outcome(str, enum.Enum):
    COLLECTING = "collecting"  # keep waiting for updates
    AGGREGATE = "aggregate"  # every selected client answered, or the deadline passed with a quorum
    RETRY = "retry"  # the deadline passed without a quorum


@dataclasses.dataclass
class OpenRound:
    """A round attempt being collected. ``answered``: clients whose update was accepted."""

    number: int
    attempt: int
    selected: tuple[str, ...]
    quorum: int
    opened_at: float
    deadline: float
    answered: set[str] = dataclasses.field(default_factory=set)
    # ``selected`` sorted, for membership by bisection: checked for every update, O(log N)
    # with no set beside the tuple (a set of 10,000 ids is 0.5 MiB of the hub's memory).
    _sorted: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = all(a < b for a, b in zip(self.selected, self.selected[1:]))
        self._sorted = self.selected if ordered else tuple(sorted(set(self.selected)))

    def _canonical(self, client_id: str) -> str | None:
        """The selected list's own string for ``client_id`` (None if not selected)."""
        index = bisect.bisect_left(self._sorted, client_id)
        if index < len(self._sorted) and self._sorted[index] == client_id:
            return self._sorted[index]
        return None

    def is_selected(self, client_id: str) -> bool:
        return self._canonical(client_id) is not None

    def record(self, client_id: str) -> None:
        canonical = self._canonical(client_id)
        if canonical is None:
            raise ValueError(f"client {client_id!r} is not selected in round {self.number}")
        # The selected list's string, not the caller's copy (one per message): answered then
        # costs a set slot per device, not a second copy of every id.
        self.answered.add(canonical)

    def all_answered(self) -> bool:
        return len(self.answered) >= len(self._sorted)  # answered only ever holds selected clients

    def outcome(self, now: float) -> Outcome:
        if self.all_answered():
            return Outcome.AGGREGATE
        if now < self.deadline:
            return Outcome.COLLECTING
        return Outcome.AGGREGATE if len(self.answered) >= self.quorum else Outcome.RETRY

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.deadline - now)


class LifecyclePhase(str, enum.Enum):
    WAITING = "waiting"
    COLLECTING = "collecting"
    DONE = "done"


class RoundLifecycle:
    """Where the federation is: which round comes next, which attempt is open, if any.

    Rounds are numbered from 1; round ``r`` produces global version ``r``. The caller
    drives it: ``try_open`` when clients come online, ``outcome`` on every tick, then
    ``complete`` after aggregating or ``retry`` when the quorum failed.
    """

    def __init__(self, policy: RoundPolicy, *, completed_rounds: int = 0, current: OpenRound | None = None,
                 next_attempt: int = 1, carried: Iterable[str] = ()) -> None:  # fmt: skip
        self.policy = policy
        self.completed_rounds = completed_rounds
        self.current = current
        self.next_attempt = next_attempt
        # Clients whose update for the next round number was already accepted (by a failed attempt).
        self.carried: set[str] = set(carried)

    @property
    def phase(self) -> LifecyclePhase:
        if self.current is not None:
            return LifecyclePhase.COLLECTING
        if self.policy.is_finished(self.completed_rounds):
            return LifecyclePhase.DONE
        return LifecyclePhase.WAITING

    @property
    def round_number(self) -> int:
        """The round being collected, the next one to open, or the last one when done."""
        if self.current is not None:
            return self.current.number
        if self.phase is LifecyclePhase.DONE:
            return self.completed_rounds
        return self.completed_rounds + 1

    def can_open(self, online: Collection[str]) -> bool:
        available = len(online) + sum(1 for client in self.carried if client not in online)
        return self.phase is LifecyclePhase.WAITING and available >= self.policy.clients_needed()

    def try_open(self, online: Collection[str], now: float) -> OpenRound | None:
        """Open the next attempt if enough clients are online; returns it, or None."""
        if not self.can_open(online):
            return None
        number = self.completed_rounds + 1
        selected = self.policy.select(online, number, self.next_attempt, self.carried)
        self.current = OpenRound(
            number=number, attempt=self.next_attempt, selected=selected,
            quorum=self.policy.quorum_for(len(selected)), opened_at=now,
            deadline=now + self.policy.round_timeout_s, answered=set(self.carried),
        )  # fmt: skip
        return self.current

    def outcome(self, now: float) -> Outcome | None:
        return None if self.current is None else self.current.outcome(now)

    def complete(self) -> OpenRound:
        """The open round was aggregated: the next round starts from attempt 1."""
        finished = self._require_open()
        self.completed_rounds = finished.number
        self.current = None
        self.next_attempt = 1
        self.carried = set()
        return finished

    def retry(self) -> OpenRound:
        """The open attempt missed its quorum: wait for clients again, keeping its answers."""
        failed = self._require_open()
        self.current = None
        self.next_attempt = failed.attempt + 1
        self.carried = set(failed.answered)
        return failed

    def _require_open(self) -> OpenRound:
        if self.current is None:
            raise RuntimeError("no round is open")
        return self.current
