"""What every federated LoRA strategy provides, and the plain weighted-mean aggregation most use.

A strategy answers three questions, for both sides of the federation:

- edge: which adapter tensors, or which leading rank components of them, leave the device
  (``split``; ``join`` puts the two parts back together), and how the global state the
  hub broadcasts becomes the client's new adapter state (``absorb``);
- hub: which updates a device of this strategy could have sent (``update_problem``,
  ``layout_spec``) and how accepted updates combine into the next global state
  (``new_aggregator``).

What leaves the device is said per tensor by ``shared_rank(key, rank)``: how many leading
components along the tensor's rank axis (``lora_keys.rank_axis``) travel. All of them
(pLoRA's B), none (pLoRA's A), or the first k (a rank split). Leading components only,
so a split is two slices and ``join`` a concatenation.

A strategy's constructor parameters are its options. The hub announces them in its round
configuration and every device builds the same strategy with ``build_strategy``; those
that change what travels (``layout_options``) are part of the federation's layout hash.

Weights are the clients' sample counts, so every mean is weighted by data size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from .. import lora_keys
from ..aggregation import AggregationError, StreamingWeightedMean
from ..lora_config import LoraSettings
from ..tensor_codec import TensorSpec, config_hash, validate
from ..usage_error import UsageError

__all__ = ["Aggregator", "MeanAggregator", "Strategy", "check_scaling", "option_count", "option_number"]

TensorDict = dict[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


def check_scaling(scaling: float) -> float:
    """LoRA's ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA): positive and finite."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.integer, np.floating)):
        raise ValueError(f"scaling must be a number (lora_alpha / r), got {scaling!r}")
    value = float(scaling)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scaling must be positive and finite (lora_alpha / r), got {scaling!r}")
    return value


def option_count(strategy: str, option: str, value: Any, *, minimum: int) -> int:
    """A strategy option that is a whole number >= ``minimum``, else a UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{strategy} option {option} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def option_number(strategy: str, option: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                  low_inclusive: bool = False) -> float:  # fmt: skip
    """A strategy option that is a finite number above ``low`` (or at it) and at most ``high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{strategy} option {option} must be a number, got {value!r}")
    number = float(value)
    above = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and above and number <= high):
        bounds = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise UsageError(f"{strategy} option {option} must be a number {bounds}, got {value!r}")
    return number


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
    """Weighted mean of exactly the tensors a strategy shares; the previous global state plays no part.

    ``update_problem`` is the strategy's own check (``Strategy.update_problem``): the
    aggregator never sums a tensor, or a part of one, that a device keeps.
    """

    def __init__(self, strategy_name: str, update_problem: Callable[[Shapes], str | None],
                 mean: StreamingWeightedMean | None = None) -> None:  # fmt: skip
        self.strategy_name = strategy_name
        self._update_problem = update_problem
        self._mean = mean if mean is not None else StreamingWeightedMean()
        self._check(self._mean.shapes())
        # The last names and shapes found acceptable: a round's updates all share them, so
        # the strategy's check (parsing every key) runs once, not once per update.
        self._accepted_shapes: dict | None = None

    def _check(self, shapes: Shapes) -> None:
        problem = self._update_problem(shapes)
        if problem is not None:
            raise AggregationError(problem)

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_weight(self) -> float:
        return self._mean.total_weight

    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        shapes = {key: np.shape(value) for key, value in shared_tensors.items()}
        if shapes != self._accepted_shapes:
            self._check(shapes)
            self._accepted_shapes = shapes
        self._mean.add(shared_tensors, weight)

    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> TensorDict:
        return self._mean.result()

    def merge(self, other: Aggregator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, MeanAggregator)
        self._mean.merge(other._mean)

    def to_state(self) -> dict[str, Any]:
        return {"strategy": self.strategy_name, **self._mean.to_state()}


class Strategy:
    """Base of all strategies. Subclasses set the class attributes below; most need nothing else.

    Attributes:
        name: the name ``get_strategy`` knows it by.
        shared_factors: LoRA factors of which some part leaves the device (``"A"``, ``"B"``).
        frozen_factors: LoRA factors the edge must not train (they stay at the federation's
            shared seed initialisation).
        heterogeneous_ranks: devices may use a rank below the federation's (their factors
            are then the leading block of the federation's; see ``FlexLoRA``).
        refit_steps: steps a device spends, of each round's local steps, training its
            personal factors alone after it absorbs the global version of a round it took
            part in (0: none). Read by the edge; strategies with a personal factor may set it.
        personal_lr_scale: the personal factors' learning rate as a multiple of the round's
            (1: the same). Only for strategies whose personal part is whole factors.
        shared_lr_scale: the shared factors' learning rate as a multiple of the round's (1: the
            same; LoRA+'s faster B, for a strategy that shares B). Only for strategies whose
            shared part is whole factors.
    """

    name: ClassVar[str]
    shared_factors: ClassVar[frozenset[str]]
    frozen_factors: ClassVar[frozenset[str]] = frozenset()
    heterogeneous_ranks: ClassVar[bool] = False
    refit_steps: int = 0
    personal_lr_scale: float = 1.0
    shared_lr_scale: float = 1.0

    # ---- options ---------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """Every constructor parameter with its value (JSON values): what the hub announces in
        its round configuration, so that each device builds the same strategy."""
        return {}

    def layout_options(self) -> dict[str, Any]:
        """The options that change what travels; they are hashed into ``layout_hash``."""
        return {}

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any], lora: LoraSettings) -> dict[str, Any]:
        """Options with the defaults that depend on the federation's LoRA layout filled in
        (e.g. a rank split's shared rank); a UsageError if they cannot fit that layout."""
        return dict(options)

    def layout_hash(self, lora: LoraSettings) -> str:
        """What every update of the federation carries as its ``lora_config_hash``: the LoRA
        settings' own hash, with this strategy's layout options folded in when it has any."""
        options = self.layout_options()
        if not options:
            return lora.config_hash()
        return config_hash({"lora": lora.to_dict(), "strategy": self.name, "options": options})

    # ---- what leaves the device ------------------------------------------------------------------

    def shared_rank(self, key: str, rank: int) -> int:
        """How many leading rank components of adapter tensor ``key`` (of rank ``rank``) leave
        the device: ``rank`` for a shared factor, 0 for a personal one or a non-factor."""
        return rank if lora_keys.factor_of(key) in self.shared_factors else 0

    def split(self, adapter_state: Mapping[str, np.ndarray]) -> tuple[TensorDict, TensorDict]:
        """Partition an adapter state into (shared, personal).

        A tensor shared whole or kept whole lands in one part as the very same object; a
        tensor shared in part (``shared_rank`` below its rank) lands in both, its leading
        rank components in ``shared`` and the rest in ``personal``, under the same name.
        Tensors that are not LoRA factors (e.g. ``modules_to_save`` copies) are personal. A
        lora_B bias has no rank axis: it travels only when all of its module's B does.
        """
        ranks = _module_ranks(adapter_state)
        shared: TensorDict = {}
        personal: TensorDict = {}
        for key, value in adapter_state.items():
            axis = lora_keys.rank_axis(key)
            if lora_keys.factor_of(key) is None:
                personal[key] = value
            elif axis is None:  # a lora_B bias
                rank = ranks[lora_keys.module_of(key)]
                (shared if self.shared_rank(key, rank) == rank else personal)[key] = value
            else:
                rank = value.shape[axis]
                count = self.shared_rank(key, rank)
                if count >= rank:
                    shared[key] = value
                elif count <= 0:
                    personal[key] = value
                else:
                    shared[key] = _take(value, axis, 0, count)
                    personal[key] = _take(value, axis, count, rank)
        return shared, personal

    def join(self, shared: Mapping[str, np.ndarray], personal: Mapping[str, np.ndarray]) -> TensorDict:
        """The adapter state ``split`` came from: a name in both parts is their rank
        components concatenated, shared ones first; a name in one part is that very object."""
        state: TensorDict = {}
        for key in [*shared, *(key for key in personal if key not in shared)]:
            if key in shared and key in personal:
                axis = lora_keys.rank_axis(key)
                if axis is None:
                    raise ValueError(f"{key!r} is in both the shared and the personal part, but has no rank axis "
                                     "to join them along")  # fmt: skip
                state[key] = np.concatenate([shared[key], personal[key]], axis=axis)
            else:
                state[key] = shared[key] if key in shared else personal[key]
        return state

    # ---- what the hub accepts --------------------------------------------------------------------

    def update_problem(self, shapes: Shapes) -> str | None:
        """Why tensors of these names and shapes could not have left a device of this strategy,
        or None if they could. The one rule both sides apply: the hub refuses such an update,
        and an aggregator never sums such a tensor, so a personal part cannot reach the global
        state either way."""
        for key, shape in shapes.items():
            factor = lora_keys.factor_of(key)
            axis = lora_keys.rank_axis(key)
            rank = shape[axis] if axis is not None and len(shape) > axis else 1
            if factor is None or self.shared_rank(key, rank) <= 0:
                described = "not a LoRA factor" if factor is None else f"a lora_{factor} factor"
                return (f"update tensor {key!r} is {described}, which strategy {self.name!r} keeps on the device; "
                        f"send only {self.shared_description()}")
        return None

    def shared_description(self) -> str:
        """What a device of this strategy sends, in words (for refusals)."""
        if not self.shared_factors:
            return "no tensors"
        return " and ".join(f"lora_{f}" for f in sorted(self.shared_factors)) + " tensors"

    def layout_spec(self, shared_tensors: Mapping[str, np.ndarray]) -> TensorSpec:
        """The layout the federation pins from its first update and holds every later one to:
        names, shapes and dtypes (strategies whose devices differ in rank leave the rank out)."""
        return TensorSpec.of(shared_tensors)

    # ---- the hub's side --------------------------------------------------------------------------

    def new_aggregator(self, scaling: float) -> Aggregator:
        """A fresh hub-side aggregator for one round. ``scaling`` is LoRA's lora_alpha / r."""
        check_scaling(scaling)
        return MeanAggregator(self.name, self.update_problem)

    def aggregator_from_state(self, state: Mapping[str, Any]) -> Aggregator:
        """Rebuild an aggregator from ``Aggregator.to_state()`` output."""
        self._check_state_owner(state)
        return MeanAggregator(self.name, self.update_problem, StreamingWeightedMean.from_state(state))

    # ---- back on the device ----------------------------------------------------------------------

    def global_part(self, global_state: Mapping[str, np.ndarray], shared_spec: TensorSpec) -> Mapping[str, np.ndarray]:
        """The part of ``global_state`` a device whose shared tensors have ``shared_spec`` takes,
        checked: exactly those names, shapes and dtypes, no NaN/Inf (else ``TensorMismatchError``
        names the first offending tensor). The global tensors themselves for most strategies."""
        validate(global_state, shared_spec, what=f"global state for strategy {self.name!r}")
        return global_state

    def starting_point(self, global_state: Mapping[str, np.ndarray], shapes: Shapes) -> dict[str, np.ndarray]:
        """The global tensors a device that now sends tensors of these names and shapes trained
        from (its update's reference point, e.g. for the hub's norm bound); names the global
        state lacks are left out. Unchecked, unlike ``global_part``."""
        return {key: global_state[key] for key in shapes if key in global_state}

    def absorb(self, local_state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> TensorDict:
        """The client's new adapter state: its shared part replaced by the global one.

        Tensors kept whole are returned as the very same objects, never modified; the
        returned global tensors (or joined ones) are new arrays, writable and not aliased.
        The global state is checked by ``global_part`` before anything is built. Keys keep
        the local state's order.
        """
        shared, personal = self.split(local_state)
        received = self.global_part(global_state, TensorSpec.of(shared))
        joined = self.join({key: np.array(received[key], copy=True) for key in shared}, personal)
        return {key: joined[key] for key in local_state}

    def _check_state_owner(self, state: Mapping[str, Any]) -> None:
        owner = state.get("strategy")
        if owner != self.name:
            raise AggregationError(
                f"aggregator state belongs to strategy {owner!r}, not {self.name!r}; restore it with that strategy"
            )

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({options})"


def _take(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """Components ``start:stop`` of ``array`` along ``axis``, as a contiguous copy (it travels)."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return np.ascontiguousarray(array[tuple(index)])


def _module_ranks(adapter_state: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Each adapted module's rank, read from its factor matrices (for its lora_B bias)."""
    ranks: dict[str, int] = {}
    for key, value in adapter_state.items():
        axis = lora_keys.rank_axis(key)
        if axis is not None:
            ranks.setdefault(lora_keys.module_of(key), value.shape[axis])
    return ranks
