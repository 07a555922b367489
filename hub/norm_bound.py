"""Norm bounding: how far one client's update may pull the global model.

A poisoning client sends shared factors far from the current global ones (a huge B). The
hub measures each update's *displacement*: the L2 norm of ``update - global`` over all of
its shared tensors together (the global version the round was trained from), and bounds it
before the update enters the round's streaming sum. Before the first global version the
reference is the shared initialisation, which the hub knows only for the factors that
start at zero (lora_B): then only those are measured and bounded, and lora_A (a random
initialisation from the announced seed, which the hub cannot rebuild without the model)
passes unbounded until a global version exists.

- ``clip`` (default): an update whose displacement exceeds the bound is scaled back onto
  the bound (``global + delta * bound / norm``) and accepted. Its pull on the new global
  version is then at most ``bound * weight / total_weight`` — never more than ``bound``.
- ``reject``: it is refused as ``invalid_update`` instead.

The bound is the smaller of an absolute one (``max_update_norm``) and a relative one:
``norm_factor`` times the median displacement of the previous aggregated round. Why the
previous round and not this one: aggregation is streaming (each update is added and
forgotten), so this round's distribution is unknown while its updates arrive, and
buffering them would give up the hub's constant memory. The median of the previous round
is robust while hostile clients are a minority (a single attacker cannot move it), and
displacements of honest clients change slowly from one round to the next. The first
round has no history: only the absolute bound applies there, so set ``max_update_norm``
when round 1 must be protected too.

The medians are kept in the hub's SQLite meta table (``update_norm_medians``), so a hub
restarted mid-round bounds the round's updates exactly as before: its aggregator is
rebuilt from the stored (unclipped) bodies through the same rule and the same reference.

Bounding is done by wrapping the strategy: :class:`NormBoundedStrategy` hands out
:class:`NormBoundedAggregator`\\ s, so every path that adds an update (a live update, a
rebuild after a restart) goes through it.
"""

from __future__ import annotations

import array
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedvlm.shared import lora_keys
from fedvlm.shared.aggregation import AggregationError, StreamingWeightedMean, sum_of_squares
from fedvlm.shared.strategies import Aggregator, Strategy

__all__ = ["NormBoundRule", "NormHistory", "NormBoundedAggregator", "NormBoundedStrategy", "update_displacement",
           "NORM_ACTIONS", "DEFAULT_NORM_FACTOR", "MEDIANS_META_KEY"]  # fmt: skip

NORM_ACTIONS = ("clip", "reject")
# Honest updates of one round differ in size by small factors (data size, local steps);
# a poisoning update that matters is orders of magnitude away. 5x the median leaves honest
# outliers alone and caps an attacker at a few honest updates' worth of pull.
DEFAULT_NORM_FACTOR = 5.0
MEDIANS_META_KEY = "update_norm_medians"
_MEDIANS_KEPT = 16


@dataclasses.dataclass(frozen=True)
class NormBoundRule:
    """The configured rule.

    Attributes:
        max_update_norm: absolute bound on an update's displacement (L2 over all shared
            tensors); None for no absolute bound.
        norm_factor: relative bound, this times the previous round's median displacement;
            None or 0 for no relative bound.
        action: ``clip`` or ``reject`` an update over the bound.
    """

    max_update_norm: float | None = None
    norm_factor: float | None = DEFAULT_NORM_FACTOR
    action: str = "clip"

    def __post_init__(self) -> None:
        for key in ("max_update_norm", "norm_factor"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):  # fmt: skip
                raise ValueError(f"{key} must be a non-negative finite number, got {value!r}")
        if self.max_update_norm == 0:
            raise ValueError("max_update_norm must be positive (leave it unset for no absolute bound)")
        if self.action not in NORM_ACTIONS:
            raise ValueError(f"norm action must be one of {', '.join(NORM_ACTIONS)}, got {self.action!r}")

    @property
    def enabled(self) -> bool:
        return self.max_update_norm is not None or bool(self.norm_factor)

    def bound(self, previous_median: float | None) -> float | None:
        """The bound for a round whose previous round's median displacement was ``previous_median``."""
        bounds = []
        if self.max_update_norm is not None:
            bounds.append(float(self.max_update_norm))
        if self.norm_factor and previous_median is not None and previous_median > 0:
            bounds.append(self.norm_factor * previous_median)
        return min(bounds) if bounds else None


class NormHistory:
    """Median displacement per aggregated round, persisted through ``load``/``save`` callables
    (the hub's SQLite meta table)."""

    def __init__(self, load: Callable[[], str | None], save: Callable[[str], None]) -> None:
        self._load, self._save = load, save

    def medians(self) -> dict[int, float]:
        text = self._load()
        return {int(r): float(m) for r, m in json.loads(text).items()} if text else {}

    def median_before(self, round_number: int) -> float | None:
        earlier = {r: m for r, m in self.medians().items() if r < round_number}
        return earlier[max(earlier)] if earlier else None

    def record(self, round_number: int, norms: Sequence[float]) -> None:
        if not norms:
            return
        medians = self.medians()
        medians[round_number] = float(statistics.median(norms))
        kept = dict(sorted(medians.items())[-_MEDIANS_KEPT:])
        self._save(json.dumps({str(r): m for r, m in kept.items()}))


def _measurable(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> list[str]:
    """The tensors whose starting point the hub knows: all of them once a global version
    exists; before that only the zero-initialised lora_B factors."""
    if reference:
        return list(tensors)
    return [name for name in tensors if lora_keys.factor_of(name) == "B"]


def update_displacement(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> float:
    """L2 norm of ``tensors - reference`` over all tensors (a missing reference tensor is zero), in float64."""
    total = 0.0
    for name, array in tensors.items():
        delta = np.asarray(array, dtype=np.float64)
        if reference is not None and name in reference:
            delta = delta - np.asarray(reference[name], dtype=np.float64)
        total += sum_of_squares(delta)  # on this thread: BLAS threads cost a busy hub ms (aggregation.py)
    return math.sqrt(total)


# Keys of NormBoundedAggregator.to_state beside the wrapped aggregator's own.
_NORMS_KEY = "norm_bound_norms"
_CLIPPED_KEY = "norm_bound_clipped"


class NormBoundedAggregator(Aggregator):
    """An aggregator that bounds every update's displacement before the wrapped one sums it.

    ``bound()`` and ``reference()`` are asked at every ``add``: the aggregator for the next
    round is made before the round that precedes it is recorded, and the history does not
    change while a round collects. ``norms`` are the raw displacements of the updates it
    took, ``clipped`` how many were scaled.
    """

    def __init__(self, inner: Aggregator, rule: NormBoundRule, bound: Callable[[], float | None],
                 reference: Callable[[], Mapping[str, np.ndarray] | None],
                 starting_point: Callable[[Mapping[str, np.ndarray], Mapping[str, tuple[int, ...]]],
                                          Mapping[str, np.ndarray]] | None = None) -> None:  # fmt: skip
        self.inner = inner
        # What of the global version a device trained from, e.g. the leading rank block of it
        # for a device of lower rank (Strategy.starting_point); by default the tensors themselves.
        self._starting_point = starting_point
        self.strategy_name = inner.strategy_name
        self.rule = rule
        self.bound = bound
        self._reference = reference
        self.norms: array.array[float] = array.array("d")  # 8 bytes a norm, not a float object's 24 + a slot
        self.clipped = 0

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Bound the update, then add it to the wrapped aggregator.

        The plain checks (floats, NaN/Inf, overflowing magnitudes: ``StreamingWeightedMean.check``)
        run before anything is clipped or refused for the bound, so garbage is refused as
        garbage, never clipped into something acceptable. An update within the bound reaches
        the wrapped aggregator unchanged, and every aggregator's ``add`` runs those checks
        itself (all or nothing): checking it here too cost a second pass over its values.
        """
        reference, bound = self._reference(), self.bound()
        if reference and self._starting_point is not None:
            reference = self._starting_point(reference, {name: np.shape(array) for name, array in shared_tensors.items()})
        measured = _measurable(shared_tensors, reference)
        if not measured:  # nothing with a known starting point (e.g. fedsa's A in round 1)
            self.inner.add(shared_tensors, weight)
            return
        try:
            norm = update_displacement({name: shared_tensors[name] for name in measured}, reference)
        except Exception:  # not measurable as sent (not arrays, shapes unlike the reference's)
            StreamingWeightedMean().check(shared_tensors, weight)  # garbage: refused as such
            raise
        tensors = shared_tensors
        clipped = False
        if bound is not None and not norm <= bound:  # over the bound, or NaN
            StreamingWeightedMean().check(shared_tensors, weight)
            if self.rule.action == "reject":
                raise AggregationError(f"update moves the shared factors by {norm:.4g} (L2 norm of update - global), "
                                       f"over this round's bound of {bound:.4g}; the update is refused")
            scale = bound / norm
            tensors = dict(shared_tensors)
            for name in measured:
                array = shared_tensors[name]
                base = np.asarray(reference[name], dtype=np.float64) if reference and name in reference else 0.0
                tensors[name] = (base + (np.asarray(array, dtype=np.float64) - base) * scale).astype(array.dtype)
            clipped = True
        self.inner.add(tensors, weight)  # all or nothing: record only once it is in
        self.norms.append(norm)
        self.clipped += int(clipped)

    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        return self.inner.result(previous_global)

    def merge(self, other: Aggregator) -> None:
        if isinstance(other, NormBoundedAggregator):
            self.inner.merge(other.inner)
            self.norms.extend(other.norms)
            self.clipped += other.clipped
        else:
            self.inner.merge(other)

    def to_state(self) -> dict[str, Any]:
        """The wrapped aggregator's state plus the norms and clip count (a resumed round
        records the same median as one that never stopped)."""
        # An array, not a list: committed with every batch, it is stored as tensor bytes (partial_sums.py).
        return {**self.inner.to_state(), _NORMS_KEY: np.asarray(self.norms, dtype=np.float64),
                _CLIPPED_KEY: self.clipped}


class NormBoundedStrategy:
    """A strategy whose aggregators bound each update's displacement; everything else is the wrapped one's.

    ``reference()`` is the global version updates are measured against (None before the
    first); ``round_number()`` the round being collected, whose bound comes from ``history``.
    """

    def __init__(self, strategy: Strategy, rule: NormBoundRule, history: NormHistory,
                 reference: Callable[[], Mapping[str, np.ndarray] | None],
                 round_number: Callable[[], int]) -> None:  # fmt: skip
        self.wrapped = strategy
        self.rule = rule
        self.history = history
        self._reference = reference
        self._round_number = round_number
        # (round, bound): asked at every add, it changes only with the round (a round's bound
        # comes from the rounds before it, all recorded before it collects), so the history
        # (a JSON read from SQLite) is read once a round, not once per update.
        self._bound_of_round: tuple[int, float | None] | None = None

    def __getattr__(self, name: str) -> Any:  # name, shared_factors, split, absorb, ...
        return getattr(self.wrapped, name)

    def current_bound(self) -> float | None:
        round_number = self._round_number()
        if self._bound_of_round is None or self._bound_of_round[0] != round_number:
            self._bound_of_round = (round_number, self.rule.bound(self.history.median_before(round_number)))
        return self._bound_of_round[1]

    def new_aggregator(self, scaling: float) -> NormBoundedAggregator:
        return NormBoundedAggregator(self.wrapped.new_aggregator(scaling), self.rule, self.current_bound,
                                     self._reference, self.wrapped.starting_point)  # fmt: skip

    def aggregator_from_state(self, state: Mapping[str, Any]) -> NormBoundedAggregator:
        inner_state = {key: value for key, value in state.items() if key not in (_NORMS_KEY, _CLIPPED_KEY)}
        aggregator = NormBoundedAggregator(self.wrapped.aggregator_from_state(inner_state), self.rule,
                                           self.current_bound, self._reference, self.wrapped.starting_point)
        aggregator.norms = array.array("d", (float(norm) for norm in state.get(_NORMS_KEY, [])))
        aggregator.clipped = int(state.get(_CLIPPED_KEY, 0))
        return aggregator
