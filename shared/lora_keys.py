"""Names of PEFT LoRA adapter tensors: which factor a tensor is and which module it adapts.

Keys look like those of ``peft.get_peft_model_state_dict``::

    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight
    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight

A live model's ``state_dict()`` also carries the adapter name
(``...q_proj.lora_A.default.weight``) and embedding layers use ``lora_embedding_A``
(no ``.weight``); both are recognised. With ``LoraConfig(lora_bias=True)`` the lora_B
layer has a bias (``...lora_B.bias``); it belongs to factor B and travels with it.
Anything else (``modules_to_save`` copies, DoRA magnitudes, ...) is not a LoRA factor:
``factor_of`` returns None, and strategies keep such tensors on the device.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar

import numpy as np

Factor = Literal["A", "B"]
FACTORS: frozenset[str] = frozenset({"A", "B"})

_LINEAR_FACTOR = re.compile(
    r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_EMBEDDING_FACTOR = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?$")

V = TypeVar("V")


@functools.lru_cache(maxsize=4096)  # every update of a federation names the same keys
def _match(key: str) -> re.Match[str] | None:
    return _LINEAR_FACTOR.match(key) or _EMBEDDING_FACTOR.match(key)


def factor_of(key: str) -> Factor | None:
    """``"A"`` or ``"B"`` for a LoRA factor tensor, None for any other tensor."""
    match = _match(key)
    return match.group("factor") if match else None  # type: ignore[return-value]


def module_of(key: str) -> str:
    """The path of the module a LoRA factor adapts, e.g. ``...self_attn.q_proj``.

    Raises ValueError for a key that is not a LoRA factor, because a module path
    guessed from an arbitrary name would silently pair unrelated tensors.
    """
    match = _match(key)
    if match is None:
        raise ValueError(
            f"{key!r} is not a LoRA factor name (expected '<module>.lora_A.weight', "
            "'<module>.lora_B.weight' or '<module>.lora_embedding_A/B'); check factor_of(key) first"
        )
    return match.group("module")


def _is_factor_matrix(key: str) -> bool:
    """True for the A/B matrices themselves, False for a lora_B bias."""
    match = _LINEAR_FACTOR.match(key)
    if match is not None:
        return match.group("param") == "weight"
    return _EMBEDDING_FACTOR.match(key) is not None


def rank_axis(key: str) -> int | None:
    """The axis of a LoRA factor tensor that runs over the rank r, or None (a lora_B bias, or not a factor).

    ``lora_A`` is ``(r, in_features)`` and ``lora_B`` is ``(out_features, r)``; PEFT's
    embedding factors are ``lora_embedding_A`` ``(r, num_embeddings)`` and
    ``lora_embedding_B`` ``(embedding_dim, r)``. Strategies that share part of the rank
    (a rank split) or accept devices of different rank slice and pad along this axis.
    """
    factor = factor_of(key)
    if factor is None or not _is_factor_matrix(key):
        return None
    return 0 if factor == "A" else 1


def at_rank(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Every LoRA factor matrix cut or zero-padded to ``rank`` along its rank axis (its leading
    components, then zeros); other tensors as they are. A lower-rank device's factors are the
    leading block of the federation's, and a padded zero component stays zero in training (it
    gets no gradient while its partner component is zero)."""
    resized = {}
    for key, array in tensors.items():
        axis = rank_axis(key)
        if axis is None or array.shape[axis] == rank:
            resized[key] = array
        elif array.shape[axis] > rank:
            index = [slice(None)] * array.ndim
            index[axis] = slice(0, rank)
            resized[key] = np.ascontiguousarray(array[tuple(index)])
        else:
            widths = [(0, 0)] * array.ndim
            widths[axis] = (0, rank - array.shape[axis])
            resized[key] = np.pad(array, widths)
    return resized


def pair_by_module(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each adapted module to its ``(lora_A key, lora_B key)``, in first-seen order.

    Keys that are not LoRA factor matrices (other tensors, lora_B biases) are ignored.
    Raises ValueError if a module has only one factor or two tensors of one factor
    (e.g. the state of two adapters mixed together).
    """
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        factor = factor_of(key)
        if factor is None or not _is_factor_matrix(key):
            continue
        factors = found.setdefault(module_of(key), {})
        if factor in factors:
            raise ValueError(
                f"module {module_of(key)!r} has two lora_{factor} tensors: {factors[factor]!r} and "
                f"{key!r}; pass the state of a single adapter"
            )
        factors[factor] = key
    pairs: dict[str, tuple[str, str]] = {}
    for module, factors in found.items():
        missing = FACTORS - factors.keys()
        if missing:
            (absent,) = missing
            (present_key,) = factors.values()
            raise ValueError(
                f"module {module!r} has {present_key!r} but no lora_{absent} tensor; "
                "every adapted module needs both LoRA factors"
            )
        pairs[module] = (factors["A"], factors["B"])
    return pairs


def select(state: Mapping[str, V], factors: Iterable[str]) -> dict[str, V]:
    """The entries of ``state`` whose LoRA factor is in ``factors``, in their original order."""
    wanted = frozenset(factors)
    unknown = wanted - FACTORS
    if unknown:
        raise ValueError(f"unknown LoRA factor(s) {sorted(unknown)}; use a subset of {sorted(FACTORS)}")
    return {key: value for key, value in state.items() if factor_of(key) in wanted}
