"""Running weighted sums of each module's LoRA product B_i @ A_i, for strategies that aggregate
the update a client's factors make rather than the factors themselves (FedEx-LoRA, FlexLoRA).

One dense float32 matrix per adapted module (the shape of the ``nn.Linear`` weight), so
the hub's memory does not grow with the number of clients; one scratch buffer the size of
the largest product is reused for every add.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .. import lora_keys
from ..aggregation import MAX_WEIGHTED_MAGNITUDE, AggregationError, sum_of_squares
from ..tensor_codec import all_finite

__all__ = ["ProductSums", "factor_pairs"]


def factor_pairs(tensors: Mapping[str, np.ndarray], *, strategy: str,
                 error: type[Exception] = AggregationError) -> dict[str, tuple[str, str]]:  # fmt: skip
    """A/B key pairs of 2-D factors with matching rank, or ``error`` saying what is wrong."""
    try:
        pairs = lora_keys.pair_by_module(tensors)
    except ValueError as problem:
        raise error(f"{strategy} needs both factors of every module: {problem}") from problem
    for module, (a_key, b_key) in pairs.items():
        a, b = tensors[a_key], tensors[b_key]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise error(f"module {module!r}: {strategy} needs 2-D factors with B.shape[1] == A.shape[0], "
                        f"got A {a.shape} and B {b.shape}")  # fmt: skip
    return pairs


def _norm(array: np.ndarray) -> float:
    flat = array.reshape(-1).astype(np.float64, copy=False)
    with np.errstate(over="ignore"):  # an overflowing norm is inf, which the bound then refuses
        return math.sqrt(sum_of_squares(flat)) if flat.size else 0.0


class ProductSums:
    """Per module, the running sum of ``weight * B_i @ A_i`` (float32, out_features x in_features),
    with how many updates (``count``) of what total weight (``total_weight``) it holds."""

    def __init__(self, sums: dict[str, np.ndarray] | None = None, count: int = 0, total_weight: float = 0.0) -> None:
        self.sums: dict[str, np.ndarray] = sums if sums is not None else {}
        self.count = count
        self.total_weight = total_weight
        self._scratch = np.empty(0, dtype=np.float32)

    def check(self, tensors: Mapping[str, np.ndarray], pairs: Mapping[str, tuple[str, str]], weight: float) -> None:
        """Raise AggregationError if ``add`` would refuse: other modules or product shapes than
        the sums', or a product that could overflow them."""
        if self.sums and set(pairs) != set(self.sums):
            other = sorted(set(pairs) ^ set(self.sums))[0]
            raise AggregationError(f"module {other!r} is in this update or in the earlier ones, not both; every "
                                   "update must adapt the same modules")  # fmt: skip
        for module, (a_key, b_key) in pairs.items():
            shape = (tensors[b_key].shape[0], tensors[a_key].shape[1])
            if self.sums and self.sums[module].shape != shape:
                raise AggregationError(f"module {module!r}: B @ A has shape {shape}, the earlier updates' "
                                       f"{self.sums[module].shape}")  # fmt: skip
            # |(B @ A)_ij| <= |B|_F |A|_F: a cheap proof that the product sum cannot overflow.
            bound = _norm(tensors[b_key]) * _norm(tensors[a_key]) * weight
            if not bound <= MAX_WEIGHTED_MAGNITUDE:
                raise AggregationError(
                    f"module {module!r}: |B| * |A| * weight = {bound:.3g} exceeds {MAX_WEIGHTED_MAGNITUDE:g}; "
                    "the update is refused (did training diverge?)"
                )

    def add(self, tensors: Mapping[str, np.ndarray], pairs: Mapping[str, tuple[str, str]], weight: float) -> None:
        """Add ``weight * B @ A`` per module; call ``check`` first (this does not)."""
        if not self.sums:
            self.sums = {module: np.zeros((tensors[b_key].shape[0], tensors[a_key].shape[1]), np.float32)
                         for module, (a_key, b_key) in pairs.items()}  # fmt: skip
        largest = max((total.size for total in self.sums.values()), default=0)
        if self._scratch.size < largest:
            self._scratch = np.empty(largest, dtype=np.float32)
        for module, (a_key, b_key) in pairs.items():
            total = self.sums[module]
            product = self._scratch[: total.size].reshape(total.shape)
            np.matmul(tensors[b_key].astype(np.float32, copy=False),
                      tensors[a_key].astype(np.float32, copy=False), out=product)  # fmt: skip
            product *= weight
            total += product
        self.count += 1
        self.total_weight += weight

    def merge(self, other: ProductSums) -> None:
        if not other.sums:
            return
        if not self.sums:
            self.sums = {module: total.copy() for module, total in other.sums.items()}
        elif {m: t.shape for m, t in self.sums.items()} != {m: t.shape for m, t in other.sums.items()}:
            raise AggregationError("cannot merge partial sums over different modules or product shapes")
        else:
            for module, total in self.sums.items():
                total += other.sums[module]
        self.count += other.count
        self.total_weight += other.total_weight

    def copied(self) -> dict[str, np.ndarray]:
        return {module: total.copy() for module, total in self.sums.items()}

    @classmethod
    def from_sums(cls, sums: Mapping[str, object], expected: Mapping[str, tuple[int, ...]] | None,
                  owner: str, count: int = 0, total_weight: float = 0.0) -> ProductSums:  # fmt: skip
        """Checked copies of persisted sums: float32, finite, and of the ``expected`` shapes if given."""
        if expected is not None and set(sums) != set(expected):
            raise AggregationError(f"{owner} state has product sums for {sorted(sums)}, expected {sorted(expected)}")
        checked: dict[str, np.ndarray] = {}
        for module, total in sums.items():
            if not isinstance(total, np.ndarray) or total.dtype != np.float32 or total.ndim != 2 or (
                    expected is not None and total.shape != expected[module]):  # fmt: skip
                shape = f" of shape {expected[module]}" if expected is not None else ""
                raise AggregationError(f"{owner} state: product sum of {module!r} must be a 2-D float32 array{shape}")
            if not all_finite(total):
                raise AggregationError(f"{owner} state: product sum of {module!r} contains NaN or Inf")
            checked[module] = np.array(total, copy=True)
        return cls(checked, count, total_weight)
