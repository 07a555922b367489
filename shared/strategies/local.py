"""Local training only: the no-federation lower bound."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..aggregation import AggregationError
from .base import Aggregator, Strategy, TensorDict, check_scaling


class LocalOnly(Strategy):
    """Each client trains alone; nothing leaves the device and the global state is always empty.

    The lower bound every federated strategy must beat: if it matches pLoRA, the
    scenario says nothing about federation. ``absorb`` accepts only an empty global
    state and returns the local state unchanged.

    Reference: none (baseline).

    Parameters:
        None at construction. ``new_aggregator(scaling)`` checks ``scaling`` and returns an
        aggregator that refuses every update.
    """

    name: ClassVar[str] = "local"
    shared_factors: ClassVar[frozenset[str]] = frozenset()

    def new_aggregator(self, scaling: float) -> NoUpdatesAggregator:
        check_scaling(scaling)
        return NoUpdatesAggregator()

    def aggregator_from_state(self, state: Mapping[str, Any]) -> NoUpdatesAggregator:
        self._check_state_owner(state)
        return NoUpdatesAggregator()


class NoUpdatesAggregator(Aggregator):
    """Refuses every update: under ``local`` a client that sends anything is misconfigured."""

    strategy_name = LocalOnly.name

    @property
    def count(self) -> int:
        return 0

    @property
    def total_weight(self) -> float:
        return 0.0

    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        raise AggregationError(
            "strategy 'local' shares nothing, so the hub accepts no updates; "
            "check that the client runs the federation's strategy"
        )

    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> TensorDict:
        return {}

    def merge(self, other: Aggregator) -> None:
        self._check_mergeable(other)

    def to_state(self) -> dict[str, Any]:
        return {"strategy": self.strategy_name}
