"""Federated LoRA strategies: which adapter tensors leave the device and how the hub combines them.

Usage::

    strategy = get_strategy("plora")
    shared, personal = strategy.split(adapter_state)           # edge: send `shared`
    aggregator = strategy.new_aggregator(scaling=2.0)          # hub: one per round
    aggregator.add(shared, weight=num_samples)                 # per accepted update
    new_global = aggregator.result(previous_global)            # hub: publish
    adapter_state = strategy.absorb(adapter_state, new_global) # edge
"""

from __future__ import annotations

from ..usage_error import UsageError
from .base import Aggregator, MeanAggregator, Strategy
from .fedex import FedExAggregator, FedExLoRA, base_delta_key, is_base_delta_key
from .fedit import FedIT
from .fedsa import FedSALoRA
from .ffa import FFALoRA
from .local import LocalOnly, NoUpdatesAggregator
from .plora import PLoRA

_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (PLoRA, FedIT, FFALoRA, FedSALoRA, FedExLoRA, LocalOnly)
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)
DEFAULT_STRATEGY = PLoRA.name


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (one of STRATEGY_NAMES).

    An unknown name is a UsageError: it comes from a person (``fedvlm-edge train --strategy``,
    a hub config), so the command lines print it on one line.
    """
    try:
        return _STRATEGIES[name]()
    except (KeyError, TypeError):
        raise UsageError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}") from None


__all__ = [
    "Aggregator",
    "DEFAULT_STRATEGY",
    "FedExAggregator",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FFALoRA",
    "LocalOnly",
    "MeanAggregator",
    "NoUpdatesAggregator",
    "PLoRA",
    "STRATEGY_NAMES",
    "Strategy",
    "base_delta_key",
    "get_strategy",
    "is_base_delta_key",
]
