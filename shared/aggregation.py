"""A running weighted mean of tensor dicts whose memory does not grow with the number of clients.

The hub adds each accepted update once and forgets it. Partial sums from several hub
workers combine with ``merge`` (a weighted sum is associative), and ``to_state`` /
``from_state`` let a hub persist a partial sum and resume it after a crash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .tensor_codec import all_finite

__all__ = ["AggregationError", "StreamingWeightedMean", "check_weight", "sum_of_squares", "MAX_WEIGHTED_MAGNITUDE"]

# Largest |weight * value| an update may contribute. LoRA factors are O(1) and weights are
# sample counts, so this rejects only garbage, and it keeps float32 sums over any realistic
# number of clients far below float32's overflow at 3.4e38: one bad client cannot turn the
# global model into Inf.
MAX_WEIGHTED_MAGNITUDE = 1e30


# Elements per BLAS dot product in ``sum_of_squares``. numpy's OpenBLAS hands a dot product
# of more than 10,000 elements to several threads, which on a hub whose cores are busy (the
# broker, workers, the other threads) must first get scheduled: measured on 2 cores with
# mosquitto and 300 devices sending 1 MiB updates, the hub spent 26-34 ms of CPU per update
# instead of 3.7 (OPENBLAS_NUM_THREADS=1), nearly all in the norms of each update. Blocks
# below that size stay on the calling thread, at one call per 8,192 elements.
_DOT_BLOCK = 8192


def sum_of_squares(array: np.ndarray) -> float:
    """The sum of the squares of ``array``'s elements, from BLAS dot products that run on the
    calling thread only (see ``_DOT_BLOCK``); NaN and Inf come through as such."""
    flat = array.reshape(-1)
    if flat.size <= _DOT_BLOCK:
        return float(np.dot(flat, flat))
    return sum(float(np.dot(block, block)) for block in (flat[start:start + _DOT_BLOCK]
                                                         for start in range(0, flat.size, _DOT_BLOCK)))


class AggregationError(ValueError):
    """An update or partial sum that cannot be aggregated; the aggregator is left unchanged."""


def check_weight(weight: Any) -> float:
    """Return ``weight`` as a float if it is a positive finite number (a sample count), else raise."""
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise AggregationError(f"weight must be a number (the client's sample count), got {weight!r}")
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise AggregationError(f"weight must be positive and finite (the client's sample count), got {weight!r}")
    return value


class StreamingWeightedMean:
    """Weighted mean of dicts of same-shaped arrays, accumulated in float32, one update at a time.

    Every update must have exactly the names and shapes of the first one and hold
    floating-point values without NaN/Inf; a rejected ``add`` leaves the sum unchanged.
    Memory: the float32 sums plus one scratch buffer the size of the largest tensor.
    """

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._count = 0
        self._total_weight = 0.0
        # Views into one reused buffer for weight * tensor, so `add` allocates nothing after
        # the first call; built lazily because merge and from_state also create sums.
        self._scaled: dict[str, np.ndarray] | None = None

    @property
    def count(self) -> int:
        """Number of updates summed (including those merged in)."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes every update must have; empty before the first update."""
        return {name: total.shape for name, total in self._sums.items()}

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * tensors`` to the running sum (weight: the client's sample count)."""
        value = self.check(tensors, weight)
        if not self._sums:
            self._sums = {name: np.zeros(array.shape, dtype=np.float32) for name, array in tensors.items()}
        if self._scaled is None:  # first add, or sums adopted by merge/from_state
            self._scaled = _scratch_views(self._sums)
        scaled_views = self._scaled
        for name, total in self._sums.items():
            scaled = scaled_views[name]
            np.multiply(tensors[name], value, out=scaled, dtype=np.float32, casting="same_kind")
            total += scaled
        self._count += 1
        self._total_weight += value

    def check(self, tensors: Mapping[str, np.ndarray], weight: float) -> float:
        """Raise AggregationError if ``add(tensors, weight)`` would refuse; return the weight as float.

        ``add`` runs every check before it touches the sum, which is what makes a
        rejected add leave the state unchanged.
        """
        weight = check_weight(weight)
        if not tensors:
            raise AggregationError("update has no tensors")
        sums = self._sums
        if sums and tensors.keys() != sums.keys():
            for name in sums:
                if name not in tensors:
                    raise AggregationError(f"update lacks tensor {name!r}, which the first update had")
            extra = next(name for name in tensors if name not in sums)
            raise AggregationError(f"update has tensor {extra!r}, which the first update did not have")
        # One errstate for the whole update: it costs microseconds, as much as a small tensor's checks.
        with np.errstate(over="ignore", invalid="ignore"):
            for name, array in tensors.items():
                if not isinstance(array, np.ndarray):
                    raise AggregationError(f"update tensor {name!r} is a {type(array).__name__}, not a numpy array")
                if array.dtype.kind != "f":
                    raise AggregationError(
                        f"update tensor {name!r} has dtype {array.dtype}; only floating-point tensors can be averaged"
                    )
                if sums and array.shape != sums[name].shape:
                    raise AggregationError(
                        f"update tensor {name!r} has shape {array.shape}, "
                        f"but the first update's had shape {sums[name].shape}"
                    )
                _check_values(name, array, weight)
        return weight

    def result(self) -> dict[str, np.ndarray]:
        """The weighted means as new float32 arrays."""
        if self._count == 0:
            raise AggregationError("no updates were added; aggregate at least one update before asking for the mean")
        scale = 1.0 / self._total_weight
        return {name: np.multiply(total, scale, dtype=np.float32) for name, total in self._sums.items()}

    def merge(self, other: StreamingWeightedMean) -> None:
        """Add another partial sum (e.g. from another hub worker) into this one; ``other`` is unchanged."""
        if not isinstance(other, StreamingWeightedMean):
            raise TypeError(f"can only merge another StreamingWeightedMean, not {type(other).__name__}")
        if other._count == 0:
            return
        if self._sums and self.shapes() != other.shapes():
            difference = _first_difference(self.shapes(), other.shapes())
            raise AggregationError(f"cannot merge partial sums over different tensors: {difference}")
        if not self._sums:
            self._sums = {name: total.copy() for name, total in other._sums.items()}
        else:
            for name, total in self._sums.items():
                total += other._sums[name]
        self._count += other._count
        self._total_weight += other._total_weight

    def to_state(self) -> dict[str, Any]:
        """``{"sums": {name: float32 array}, "count": int, "total_weight": float}``, copied.

        Store ``total_weight`` with ``repr`` (or as float64) so it reads back exactly.
        """
        return {
            "sums": {name: total.copy() for name, total in self._sums.items()},
            "count": self._count,
            "total_weight": self._total_weight,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StreamingWeightedMean:
        """Rebuild an aggregator from ``to_state()`` output, checking it is consistent."""
        missing = {"sums", "count", "total_weight"} - set(state)
        if missing:
            raise AggregationError(f"aggregator state lacks {sorted(missing)}")
        sums, count, total_weight = state["sums"], state["count"], state["total_weight"]
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise AggregationError(f"aggregator state has count {count!r}; expected a non-negative integer")
        if not isinstance(sums, Mapping) or not isinstance(total_weight, (int, float, np.integer, np.floating)):
            raise AggregationError("aggregator state needs a dict of sums and a numeric total_weight")
        if count == 0:
            if sums or total_weight != 0:
                raise AggregationError("aggregator state with count 0 must have no sums and total_weight 0")
            return cls()
        if not sums:
            raise AggregationError(f"aggregator state has count {count} but no sums")
        check_weight(total_weight)
        aggregator = cls()
        for name, total in sums.items():
            if not isinstance(total, np.ndarray) or total.dtype != np.float32:
                raise AggregationError(f"aggregator state sum {name!r} must be a float32 numpy array")
            if not all_finite(total):
                raise AggregationError(f"aggregator state sum {name!r} contains NaN or Inf")
            aggregator._sums[name] = np.array(total, dtype=np.float32, copy=True)
        aggregator._count = int(count)
        aggregator._total_weight = float(total_weight)
        return aggregator


def _check_values(name: str, array: np.ndarray, weight: float) -> None:
    """Refuse NaN, Inf and values whose weighted size could overflow the float32 sum.

    Fast path: one BLAS dot product, no temporary array. NaN/Inf make it non-finite, and
    max|x| <= sqrt(x.x), so a small enough norm proves every value is small enough.
    Only an update that fails the fast test pays for the exact element-wise checks.
    Callers silence numpy's overflow warnings: an overflowing norm just means "look closer".
    """
    flat = array.reshape(-1)
    if flat.dtype.char not in "fd":  # float16 and longdouble have no BLAS dot
        flat = flat.astype(np.float32)
    norm = math.sqrt(sum_of_squares(flat)) if flat.size else 0.0
    if norm * weight <= MAX_WEIGHTED_MAGNITUDE:  # False for NaN and Inf
        return
    if not all_finite(array):
        raise AggregationError(f"update tensor {name!r} contains NaN or Inf; the update is refused")
    peak = float(np.max(np.abs(array))) if array.size else 0.0
    if peak * weight > MAX_WEIGHTED_MAGNITUDE:
        raise AggregationError(
            f"update tensor {name!r} has a value of magnitude {peak:.3g}, which times weight {weight:g} exceeds "
            f"{MAX_WEIGHTED_MAGNITUDE:g}; the update is refused (did training diverge?)"
        )


def _scratch_views(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One float32 buffer the size of the largest sum, viewed in each sum's shape."""
    buffer = np.empty(max(total.size for total in sums.values()), dtype=np.float32)
    return {name: buffer[: total.size].reshape(total.shape) for name, total in sums.items()}


def _first_difference(mine: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> str:
    for name, shape in mine.items():
        if name not in theirs:
            return f"tensor {name!r} is only in this sum"
        if theirs[name] != shape:
            return f"tensor {name!r} has shape {shape} here and {theirs[name]} in the other sum"
    extra = next(name for name in theirs if name not in mine)
    return f"tensor {extra!r} is only in the other sum"
