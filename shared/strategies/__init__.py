"""Federated LoRA strategies: which adapter tensors leave the device and how the hub combines them.

Usage::

    strategy = build_strategy("plora", {}, lora_settings)     # hub and edge alike
    shared, personal = strategy.split(adapter_state)           # edge: send `shared`
    aggregator = strategy.new_aggregator(scaling=2.0)          # hub: one per round
    aggregator.add(shared, weight=num_samples)                 # per accepted update
    new_global = aggregator.result(previous_global)            # hub: publish
    adapter_state = strategy.absorb(adapter_state, new_global) # edge
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..lora_config import LoraSettings
from ..usage_error import UsageError
from .base import Aggregator, MeanAggregator, Strategy
from .fedex import FedExAggregator, FedExLoRA, base_delta_key, is_base_delta_key
from .feddpa import FedDPA
from .fedit import FedIT
from .fedsa import FedSALoRA
from .flexlora import FlexLoRA, FlexLoRAAggregator
from .ffa import FFALoRA
from .local import LocalOnly, NoUpdatesAggregator
from .plora import PLoRA
from .rank_split import RankSplit
from .vision_shared import VisionShared

_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (PLoRA, FedIT, FFALoRA, FedSALoRA, FedExLoRA, LocalOnly, RankSplit, FedDPA, FlexLoRA,
                              VisionShared)
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)
DEFAULT_STRATEGY = PLoRA.name


def _strategy_class(name: str) -> type[Strategy]:
    try:
        return _STRATEGIES[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}") from None


def option_names(name: str) -> tuple[str, ...]:
    """The options (constructor parameters) strategy ``name`` takes."""
    parameters = list(inspect.signature(_strategy_class(name).__init__).parameters.values())[1:]
    return tuple(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name`` (one of STRATEGY_NAMES), built with ``options``.

    An unknown name or option is a UsageError: they come from a person (``fedvlm-hub start
    --strategy``, a hub config, ``fedvlm simulate --strategies``), so the command lines
    print it on one line. Defaults that depend on the federation's LoRA layout stay unset
    here; ``build_strategy`` fills them in.
    """
    cls = _strategy_class(name)
    known = option_names(name)
    unknown = [key for key in options if key not in known]
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise UsageError(f"strategy {name!r} has no option {unknown[0]!r}; {takes}")
    return cls(**options)


def build_strategy(name: str, options: Mapping[str, Any] | None, lora: LoraSettings) -> Strategy:
    """The strategy a federation with LoRA layout ``lora`` runs: ``options`` with the defaults
    that depend on the layout resolved, checked against it. The hub and every device call
    this with the same arguments (the hub announces them), so they build the same strategy."""
    return get_strategy(name, **_strategy_class(name).resolve_options(dict(options or {}), lora))


__all__ = [
    "Aggregator",
    "DEFAULT_STRATEGY",
    "FedExAggregator",
    "FedDPA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FFALoRA",
    "FlexLoRA",
    "FlexLoRAAggregator",
    "LocalOnly",
    "MeanAggregator",
    "NoUpdatesAggregator",
    "PLoRA",
    "RankSplit",
    "STRATEGY_NAMES",
    "Strategy",
    "VisionShared",
    "base_delta_key",
    "build_strategy",
    "get_strategy",
    "is_base_delta_key",
    "option_names",
]
