"""FlexLoRA: devices of different LoRA rank in one federation, aggregated through the full update and an SVD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .. import lora_keys
from ..aggregation import AggregationError, StreamingWeightedMean
from ..lora_config import LoraSettings
from ..tensor_codec import TensorSpec, validate
from ..usage_error import UsageError
from .base import Aggregator, Shapes, Strategy, TensorDict, check_scaling, option_count
from .products import ProductSums, factor_pairs

__all__ = ["FlexLoRA", "FlexLoRAAggregator"]


class FlexLoRA(Strategy):
    """Heterogeneous ranks: each device trains LoRA at the rank it can afford; the hub averages
    the full updates ``B_i A_i`` and hands every device the best approximation of the mean at
    that device's rank.

    The federation's LoRA rank r is the largest a device may use; a device of rank
    r_i <= r holds factors ``A_i`` (r_i x in) and ``B_i`` (out x r_i) and sends both. The
    hub cannot average factors of different shapes, and averaging factors is inexact anyway
    (mean(B) mean(A) != mean(B A)), so it sums the products, exactly as FlexLoRA does:

        M = sum_i w_i B_i A_i / sum_i w_i          (w_i: sample counts)

    a running sum of one dense matrix per adapted module (hub memory flat in the number of
    clients), then redistributes it by SVD, ``M = U S V^T``:

        B = U[:, :r] sqrt(S[:r]),   A = sqrt(S[:r]) V^T[:r]

    (the singular values split evenly between the two factors, so both train at the same
    scale; FlexLoRA specifies the product, which is the same either way). The published
    global version has rank r; a device of rank r_i takes its leading r_i components
    (``global_part``), which by Eckart-Young is the best rank-r_i approximation of M. Every
    device is scaled by the federation's ``alpha / r`` whatever its own rank (its PEFT
    ``lora_alpha`` is ``alpha * r_i / r``), so all products are in the same units, and a
    lower-rank device's initial factors are the leading block of the federation's seeded
    initialisation. What truncation discards is not kept anywhere (as in FlexLoRA; FedEx-LoRA
    would fold it into the base weight). No part of the adapter is personal: every device
    ends a round with (its rank of) the same global adapter.

    Reference: J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of Large
    Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024,
    arXiv:2402.11505. (Zero-padding the factors instead, as HetLoRA does, averages them
    inexactly and dilutes the components few devices have: Y. J. Cho et al., "Heterogeneous
    LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024.)

    Parameters:
        max_rank: the largest device rank and the rank of the global version; it is the
            federation's LoRA rank r (default None: filled in from the LoRA settings by
            ``build_strategy``; another value is refused: set the LoRA rank instead).
        ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r, which the mean of the
        products does not need (it is only checked): every device has that scaling.
    """

    name: ClassVar[str] = "flexlora"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"A", "B"})
    heterogeneous_ranks: ClassVar[bool] = True

    def __init__(self, max_rank: int | None = None) -> None:
        self.max_rank = None if max_rank is None else option_count(self.name, "max_rank", max_rank, minimum=1)

    def options(self) -> dict[str, Any]:
        return {"max_rank": self.max_rank}

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any], lora: LoraSettings) -> dict[str, Any]:
        resolved = dict(options)
        if resolved.get("max_rank") not in (None, lora.r):
            raise UsageError(f"{cls.name} option max_rank={resolved['max_rank']!r} differs from the LoRA rank "
                             f"r={lora.r}: the federation's rank is the largest a device may use, so set r instead")
        resolved["max_rank"] = lora.r
        return resolved

    def update_problem(self, shapes: Shapes) -> str | None:
        problem = super().update_problem(shapes)
        if problem is not None:
            return problem
        ranks: set[int] = set()
        for key, shape in shapes.items():
            axis = lora_keys.rank_axis(key)
            if axis is None:
                return f"update tensor {key!r} is a lora_B bias, which {self.name} does not aggregate; adapt without one"
            if len(shape) != 2:
                return f"update tensor {key!r} has shape {tuple(shape)}; {self.name} needs 2-D factors"
            ranks.add(shape[axis])
        if len(ranks) > 1:
            return f"update mixes ranks {sorted(ranks)}; a device sends all its factors at its one rank"
        if ranks and self.max_rank is not None and max(ranks) > self.max_rank:
            return (f"update has rank {max(ranks)}, above the federation's rank {self.max_rank}; a device may use "
                    "any rank up to it")  # fmt: skip
        return None

    def layout_spec(self, shared_tensors: Mapping[str, np.ndarray]) -> TensorSpec:
        """Names, dtypes and the shapes without the rank (recorded as 0): devices differ in it."""
        spec = {}
        for key, array in shared_tensors.items():
            shape = list(array.shape)
            axis = lora_keys.rank_axis(key)
            if axis is not None and axis < len(shape):
                shape[axis] = 0
            spec[key] = (tuple(shape), array.dtype.name)
        return TensorSpec(spec)

    def global_part(self, global_state: Mapping[str, np.ndarray], shared_spec: TensorSpec) -> Mapping[str, np.ndarray]:
        """The leading components of the global factors, at the rank of the device's own (checked)."""
        rank = _spec_rank(shared_spec)
        part = lora_keys.at_rank(global_state, rank) if rank is not None else global_state
        validate(part, shared_spec, what=f"global state for strategy {self.name!r}")
        return part

    def starting_point(self, global_state: Mapping[str, np.ndarray], shapes: Shapes) -> dict[str, np.ndarray]:
        rank = _spec_rank(TensorSpec({key: (shape, "float32") for key, shape in shapes.items()}))
        kept = super().starting_point(global_state, shapes)
        return lora_keys.at_rank(kept, rank) if rank is not None else kept

    def new_aggregator(self, scaling: float) -> FlexLoRAAggregator:
        check_scaling(scaling)
        return FlexLoRAAggregator(self._required_max_rank(), self.update_problem)

    def aggregator_from_state(self, state: Mapping[str, Any]) -> FlexLoRAAggregator:
        self._check_state_owner(state)
        return FlexLoRAAggregator.from_state(state, self._required_max_rank(), self.update_problem)

    def _required_max_rank(self) -> int:
        if self.max_rank is None:
            raise ValueError("FlexLoRA aggregates to the federation's rank: build it with "
                             "build_strategy('flexlora', options, lora_settings), or give max_rank")  # fmt: skip
        return self.max_rank


def _spec_rank(spec: TensorSpec) -> int | None:
    """The rank of a device's factors, read from any factor matrix in ``spec``."""
    for key, (shape, _) in spec.items():
        axis = lora_keys.rank_axis(key)
        if axis is not None and axis < len(shape):
            return shape[axis]
    return None


class FlexLoRAAggregator(Aggregator):
    """The weighted mean of each module's ``B_i @ A_i``, redistributed at ``max_rank`` by SVD."""

    strategy_name = FlexLoRA.name

    def __init__(self, max_rank: int, update_problem, products: ProductSums | None = None,
                 keys: dict[str, tuple[str, str]] | None = None) -> None:  # fmt: skip
        self.max_rank = max_rank
        self._update_problem = update_problem
        self._products = products if products is not None else ProductSums()
        self._keys: dict[str, tuple[str, str]] = keys if keys is not None else {}  # module -> (A key, B key)

    @property
    def count(self) -> int:
        return self._products.count

    @property
    def total_weight(self) -> float:
        return self._products.total_weight

    def add(self, shared_tensors: Mapping[str, np.ndarray], weight: float) -> None:
        problem = self._update_problem({key: np.shape(value) for key, value in shared_tensors.items()})
        if problem is not None:
            raise AggregationError(problem)
        value = StreamingWeightedMean().check(shared_tensors, weight)  # floats, finite, not huge
        pairs = factor_pairs(shared_tensors, strategy="FlexLoRA")
        if self._keys and pairs != self._keys:
            raise AggregationError("update adapts other modules (or names its factors otherwise) than the earlier "
                                   "updates of this round")  # fmt: skip
        self._products.check(shared_tensors, pairs, value)
        self._products.add(shared_tensors, pairs, value)
        self._keys = dict(pairs)

    def result(self, previous_global: Mapping[str, np.ndarray] | None) -> TensorDict:
        """Per module, the rank-``max_rank`` factors of the mean product (see FlexLoRA)."""
        if self.count == 0:
            raise AggregationError("no updates were added; aggregate at least one update before asking for the mean")
        new_global: TensorDict = {}
        for module, (a_key, b_key) in self._keys.items():
            mean = self._products.sums[module].astype(np.float64) / self.total_weight
            u, singular, vt = np.linalg.svd(mean, full_matrices=False)
            kept = min(self.max_rank, singular.size)
            root = np.sqrt(singular[:kept])
            b = np.zeros((mean.shape[0], self.max_rank), np.float32)
            a = np.zeros((self.max_rank, mean.shape[1]), np.float32)
            b[:, :kept] = u[:, :kept] * root
            a[:kept] = root[:, None] * vt[:kept]
            new_global[a_key], new_global[b_key] = a, b
        return new_global

    def merge(self, other: Aggregator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, FlexLoRAAggregator)
        if other.count == 0:
            return
        if self._keys and other._keys != self._keys:
            raise AggregationError("cannot merge FlexLoRA aggregates over different modules")
        self._products.merge(other._products)
        self._keys = dict(other._keys)

    def to_state(self) -> dict[str, Any]:
        return {"strategy": self.strategy_name, "count": self.count, "total_weight": self.total_weight,
                "sums": self._products.copied(), "factor_keys": {m: list(k) for m, k in self._keys.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], max_rank: int, update_problem) -> FlexLoRAAggregator:
        try:
            count, total_weight = int(state["count"]), float(state["total_weight"])
            keys = {str(module): (str(a_key), str(b_key)) for module, (a_key, b_key) in state["factor_keys"].items()}
            sums = dict(state["sums"])
        except (KeyError, TypeError, ValueError) as problem:
            raise AggregationError(f"FlexLoRA aggregator state needs count, total_weight, sums and factor_keys "
                                   f"({problem!r})") from None
        if set(sums) != set(keys) or count < 0 or (count > 0) != (total_weight > 0) or (count > 0) != bool(keys):
            raise AggregationError("FlexLoRA aggregator state is inconsistent (sums, factor keys and count disagree)")
        products = ProductSums.from_sums(sums, None, "FlexLoRA aggregator", count, total_weight)
        return cls(max_rank, update_problem, products, keys)
