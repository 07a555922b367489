"""What every federated LoRA strategy provides, and the plain weighted-mean aggregation most use.

A strategy answers three questions, for both sides of the federation:

- edge: which adapter tensors leave the device (``split``), and how the global state the
  hub broadcasts becomes the client's new adapter state (``absorb``);
- hub: how accepted updates combine into the next global state (``new_aggregator``).

Weights are the clients' sample counts, so every mean is weighted by data size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from .. import lora_keys
from ..aggregation import AggregationError, StreamingWeightedMean
from ..tensor_codec import TensorSpec, validate

__all__ = ["Aggregator", "MeanAggregator", "Strategy", "check_scaling", "unshared_tensor_problem"]

TensorDict = dict[str, np.ndarray]


def check_scaling(scaling: float) -> float:
    """LoRA's ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA): positive and finite."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.integer, np.floating)):
        raise ValueError(f"scaling must be a number (lora_alpha / r), got {scaling!r}")
    value = float(scaling)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scaling must be positive and finite (lora_alpha / r), got {scaling!r}")
    return value


class Aggregator(ABC):
    """Hub side of one round: accepted updates in, the next global state out.

    ``add`` either takes the whole update or raises and changes nothing. ``merge`` adds
    another worker's partial aggregate of the same strategy. ``to_state`` returns a dict
    of arrays and scalars that ``Strategy.aggregator_from_state`` turns back into an
    equivalent aggregator, so a hub can persist a round in progress.
    """

    strategy_name: str

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of updates aggregated (merged ones included)."""

    @property
    @abstractmethod
    def total_weight(self) -> float:
        """Sum of the weights (sample counts) of the aggregated updates."""

    @abstractmethod
    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Aggregate one client's shared tensors, weighted by its sample count."""

    @abstractmethod
    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> TensorDict:
        """The new global state, given the previous one (None before the first aggregation)."""

    @abstractmethod
    def merge(self, other: Aggregator) -> None:
        """Add another partial aggregate of the same strategy into this one."""

    @abstractmethod
    def to_state(self) -> dict[str, Any]:
        """Arrays and scalars from which ``Strategy.aggregator_from_state`` rebuilds this aggregator."""

    def _check_mergeable(self, other: Aggregator) -> None:
        if type(other) is not type(self) or other.strategy_name != self.strategy_name:
            raise AggregationError(
                f"cannot merge a {other.strategy_name!r} aggregate into a {self.strategy_name!r} one"
            )


class MeanAggregator(Aggregator):
    """Weighted mean of exactly the factors a strategy shares; the previous global state plays no part."""

    def __init__(self, strategy_name: str, shared_factors: frozenset[str],
                 mean: StreamingWeightedMean | None = None) -> None:  # fmt: skip
        self.strategy_name = strategy_name
        self.shared_factors = shared_factors
        self._mean = mean if mean is not None else StreamingWeightedMean()
        self._check_factors(self._mean.shapes())

    def _check_factors(self, keys: Iterable[str]) -> None:
        problem = unshared_tensor_problem(keys, self.shared_factors, self.strategy_name)
        if problem is not None:
            raise AggregationError(problem)

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_weight(self) -> float:
        return self._mean.total_weight

    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        self._check_factors(shared_tensors)
        self._mean.add(shared_tensors, weight)

    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> TensorDict:
        return self._mean.result()

    def merge(self, other: Aggregator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, MeanAggregator)
        self._mean.merge(other._mean)

    def to_state(self) -> dict[str, Any]:
        return {"strategy": self.strategy_name, **self._mean.to_state()}


def unshared_tensor_problem(keys: Iterable[str], shared_factors: frozenset[str], strategy_name: str) -> str | None:
    """Why one of ``keys`` may not leave a device under this strategy, or None if all may.

    The one rule both sides apply: the hub refuses such an update, and an aggregator never
    sums such a tensor, so a personal factor cannot reach the global state either way.
    """
    for key in keys:
        factor = lora_keys.factor_of(key)
        if factor not in shared_factors:
            described = "not a LoRA factor" if factor is None else f"a lora_{factor} factor"
            allowed = " and ".join(f"lora_{f}" for f in sorted(shared_factors)) or "no"
            return (f"update tensor {key!r} is {described}, which strategy {strategy_name!r} keeps on the device; "
                    f"send only {allowed} tensors")
    return None


class Strategy:
    """Base of all strategies. Subclasses set the class attributes below; most need nothing else.

    Attributes:
        name: the name ``get_strategy`` knows it by.
        shared_factors: LoRA factors that leave the device (``"A"``, ``"B"``).
        frozen_factors: LoRA factors the edge must not train (they stay at the federation's
            shared seed initialisation).
    """

    name: ClassVar[str]
    shared_factors: ClassVar[frozenset[str]]
    frozen_factors: ClassVar[frozenset[str]] = frozenset()

    def split(self, adapter_state: Mapping[str, np.ndarray]) -> tuple[TensorDict, TensorDict]:
        """Partition an adapter state into (shared, personal); every key lands in exactly one.

        Tensors that are not LoRA factors (e.g. ``modules_to_save`` copies) are personal.
        """
        shared = lora_keys.select(adapter_state, self.shared_factors)
        personal = {key: value for key, value in adapter_state.items() if key not in shared}
        return shared, personal

    def new_aggregator(self, scaling: float) -> Aggregator:
        """A fresh hub-side aggregator for one round. ``scaling`` is LoRA's lora_alpha / r."""
        check_scaling(scaling)
        return MeanAggregator(self.name, self.shared_factors)

    def aggregator_from_state(self, state: Mapping[str, Any]) -> Aggregator:
        """Rebuild an aggregator from ``Aggregator.to_state()`` output."""
        self._check_state_owner(state)
        return MeanAggregator(self.name, self.shared_factors, StreamingWeightedMean.from_state(state))

    def absorb(self, local_state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> TensorDict:
        """The client's new adapter state: shared factors replaced by the global ones.

        Personal tensors are returned as the very same objects, never modified. The global
        state must have exactly the names, shapes and dtypes of the local shared tensors
        and no NaN/Inf, else ``TensorMismatchError`` names the first offending tensor.
        The returned global tensors are copies, so they are writable and not aliased.
        """
        shared, _ = self.split(local_state)
        validate(global_state, TensorSpec.of(shared), what=f"global state for strategy {self.name!r}")
        return {key: (np.array(global_state[key], copy=True) if key in shared else value)
                for key, value in local_state.items()}  # fmt: skip

    def _check_state_owner(self, state: Mapping[str, Any]) -> None:
        owner = state.get("strategy")
        if owner != self.name:
            raise AggregationError(
                f"aggregator state belongs to strategy {owner!r}, not {self.name!r}; restore it with that strategy"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
