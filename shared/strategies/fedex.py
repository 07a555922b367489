"""FedEx-LoRA: exact federated LoRA, the averaging error folded into the frozen base weight."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .. import lora_keys
from ..aggregation import AggregationError, StreamingWeightedMean
from ..tensor_codec import TensorSpec, validate
from .base import Aggregator, Strategy, TensorDict, check_scaling
from .products import ProductSums, factor_pairs

__all__ = ["FedExLoRA", "FedExAggregator", "BASE_DELTA_SUFFIX", "base_delta_key", "is_base_delta_key"]

BASE_DELTA_SUFFIX = ".fedex_base_delta"
# Names of the running sums of B_i @ A_i inside a persisted aggregator state.
_PRODUCT_SUM_SUFFIX = ".fedex_product_sum"


def base_delta_key(module: str) -> str:
    """``"<module>.fedex_base_delta"``: the global-state entry holding a module's base-weight delta."""
    return module + BASE_DELTA_SUFFIX


def is_base_delta_key(key: str) -> bool:
    return key.endswith(BASE_DELTA_SUFFIX)


class FedExLoRA(Strategy):
    """Share lora_A and lora_B; average them, and fold the averaging error into the base weight.

    Averaging the factors separately is inexact: mean(B) @ mean(A) != mean(B_i @ A_i).
    FedEx-LoRA keeps the averaged factors and adds the missing residual to the frozen
    weight, so every client's model equals the FedAvg of the clients' full models.

    Contract between hub and edge (per adapted module, weights w_i = sample counts,
    mean_w = weighted mean, s = ``scaling`` = lora_alpha / r, the same on both sides):

    - The global state holds ``<module>.lora_A.weight = mean_w(A_i)``,
      ``<module>.lora_B.weight = mean_w(B_i)`` and a dense float32
      ``<module>.fedex_base_delta`` of shape ``B.shape[0] x A.shape[1]`` (the shape of
      ``B @ A``, i.e. the ``nn.Linear`` weight's (out_features, in_features)):

          delta_t = delta_{t-1} + s * (mean_w(B_i @ A_i) - mean_w(B) @ mean_w(A))

      with delta_0 = 0 (``previous_global`` None or without deltas). The hub computes it
      streaming: a running weighted sum of B_i @ A_i per module, so hub memory does not
      grow with the number of clients (it is one dense matrix per adapted module).
    - ``absorb`` returns the client's state with A and B replaced by the means and every
      ``fedex_base_delta`` entry set to the global one. The edge uses as frozen weight
      ``W0 + delta``, where W0 is the base weight as originally loaded: the delta is
      cumulative since the federation began, so it replaces the previously applied delta
      rather than adding to it (with a quantised W0, keep the delta in full precision
      beside it). Then ``W0 + delta_t + s * mean(B) @ mean(A)`` equals
      ``W0 + delta_{t-1} + s * mean_w(B_i @ A_i)`` up to float rounding.
    - Clients never send deltas; ``split`` puts a state's delta entries with the
      personal part only because they stay on the device. Factors must be 2-D.

    Reference: R. Singhal, K. Ponkshe, P. Vepakomma, "FedEx-LoRA: Exact Aggregation for
    Federated and Efficient Fine-Tuning of Foundation Models", ACL 2025, arXiv:2410.09432.

    Parameters:
        None at construction. ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r
        (lora_alpha / sqrt(r) with rsLoRA): the delta is in weight units, scaled by it.
    """

    name: ClassVar[str] = "fedex"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"A", "B"})

    def new_aggregator(self, scaling: float) -> FedExAggregator:
        return FedExAggregator(scaling)

    def aggregator_from_state(self, state: Mapping[str, Any]) -> FedExAggregator:
        self._check_state_owner(state)
        return FedExAggregator.from_state(state)

    def absorb(self, local_state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> TensorDict:
        """The client's new state: A and B means and base deltas from ``global_state``, the rest untouched."""
        shared, _ = self.split(local_state)
        pairs = factor_pairs(shared, strategy="FedEx-LoRA", error=ValueError)
        expected = dict(TensorSpec.of(shared))
        for module, (a_key, b_key) in pairs.items():
            expected[base_delta_key(module)] = ((shared[b_key].shape[0], shared[a_key].shape[-1]), "float32")
        validate(global_state, TensorSpec(expected), what=f"global state for strategy {self.name!r}")
        # Keep the local order; deltas a state does not hold yet (first round) go at the end.
        new_state = {key: (np.array(global_state[key], copy=True) if key in expected else value)
                     for key, value in local_state.items()}  # fmt: skip
        for key in expected:
            if key not in new_state:
                new_state[key] = np.array(global_state[key], copy=True)
        return new_state


class FedExAggregator(Aggregator):
    """Weighted means of A and B plus running weighted sums of B_i @ A_i, one per module."""

    strategy_name = FedExLoRA.name

    def __init__(self, scaling: float, factors: StreamingWeightedMean | None = None,
                 products: ProductSums | None = None) -> None:  # fmt: skip
        self.scaling = check_scaling(scaling)
        self._factors = factors if factors is not None else StreamingWeightedMean()
        self._products = products if products is not None else ProductSums()

    @property
    def count(self) -> int:
        return self._factors.count

    @property
    def total_weight(self) -> float:
        return self._factors.total_weight

    def _modules(self) -> dict[str, tuple[str, str]]:
        return lora_keys.pair_by_module(self._factors.shapes())

    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        for key in shared_tensors:
            if lora_keys.factor_of(key) is None:
                raise AggregationError(
                    f"update tensor {key!r} is not a LoRA factor; FedEx-LoRA clients send only lora_A and lora_B"
                )
        value = self._factors.check(shared_tensors, weight)
        pairs = factor_pairs(shared_tensors, strategy="FedEx-LoRA")
        self._products.check(shared_tensors, pairs, value)
        # Everything is checked: from here on the update is taken whole.
        self._factors.add(shared_tensors, value)
        self._products.add(shared_tensors, pairs, value)

    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> TensorDict:
        """Means of A and B, and per module the cumulative ``fedex_base_delta`` (see FedExLoRA)."""
        means = self._factors.result()
        previous = self._previous_deltas(previous_global)
        new_global: TensorDict = dict(means)
        for module, (a_key, b_key) in self._modules().items():
            # float64 for the difference of two close matrices; one module at a time.
            mean_product = self._products.sums[module].astype(np.float64) / self.total_weight
            residual = mean_product - means[b_key].astype(np.float64) @ means[a_key].astype(np.float64)
            delta = residual * self.scaling
            if module in previous:
                delta += previous[module]
            new_global[base_delta_key(module)] = delta.astype(np.float32)
        return new_global

    def _previous_deltas(self, previous_global: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The previous deltas by module: none before the first aggregation, else one per module."""
        if previous_global is None or not any(is_base_delta_key(key) for key in previous_global):
            return {}
        spec = TensorSpec({base_delta_key(module): (total.shape, "float32")
                           for module, total in self._products.sums.items()})  # fmt: skip
        deltas = {key: value for key, value in previous_global.items() if is_base_delta_key(key)}
        try:
            validate(deltas, spec, what="previous global state")
        except ValueError as problem:
            raise AggregationError(
                f"{problem}; pass the last published FedEx global state, or None before the first aggregation"
            ) from problem
        return {module: deltas[base_delta_key(module)].astype(np.float64) for module in self._products.sums}

    def merge(self, other: Aggregator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, FedExAggregator)
        if other.scaling != self.scaling:
            raise AggregationError(f"cannot merge FedEx aggregates with scalings {self.scaling} and {other.scaling}")
        if other.count == 0:
            return
        self._factors.merge(other._factors)  # checks the factor names and shapes agree
        self._products.merge(other._products)

    def to_state(self) -> dict[str, Any]:
        """Like ``StreamingWeightedMean.to_state`` plus ``strategy``, ``scaling`` and the product sums
        (as ``<module>.fedex_product_sum`` entries of ``sums``)."""
        state = self._factors.to_state()
        for module, total in self._products.copied().items():
            state["sums"][module + _PRODUCT_SUM_SUFFIX] = total
        return {"strategy": self.strategy_name, "scaling": self.scaling, **state}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FedExAggregator:
        if "scaling" not in state or not isinstance(state.get("sums"), Mapping):
            raise AggregationError("FedEx aggregator state needs 'scaling' and a dict of 'sums'")
        factor_sums = {key: value for key, value in state["sums"].items() if not key.endswith(_PRODUCT_SUM_SUFFIX)}
        product_sums = {key[: -len(_PRODUCT_SUM_SUFFIX)]: value
                        for key, value in state["sums"].items() if key.endswith(_PRODUCT_SUM_SUFFIX)}  # fmt: skip
        factors = StreamingWeightedMean.from_state({**state, "sums": factor_sums})
        try:
            modules = lora_keys.pair_by_module(factors.shapes())
        except ValueError as problem:
            raise AggregationError(f"FedEx aggregator state: {problem}") from problem
        shapes = factors.shapes()
        expected = {module: (shapes[b_key][0], shapes[a_key][1]) for module, (a_key, b_key) in modules.items()}
        return cls(state["scaling"], factors, ProductSums.from_sums(product_sums, expected, "FedEx aggregator"))
