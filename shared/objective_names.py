"""The training objectives a federation may ask its devices for, as the hub and the devices
name them (the code is the edge's: ``fedvlm.edge.objectives``). The hub announces the
objective and DPO's beta in the round config; both sides check them with :func:`check_objective`."""

from __future__ import annotations

import math

from fedvlm.shared.usage_error import UsageError

OBJECTIVE_NAMES: tuple[str, ...] = ("sft", "dpo")
DEFAULT_OBJECTIVE = "sft"
DEFAULT_DPO_BETA = 0.1


def check_objective(name: str, dpo_beta: float) -> None:
    """A ``UsageError`` naming the flag when ``name`` or ``dpo_beta`` cannot be used."""
    if name not in OBJECTIVE_NAMES:
        raise UsageError(f"unknown --objective {name!r}; choose one of {', '.join(OBJECTIVE_NAMES)}")
    if isinstance(dpo_beta, bool) or not isinstance(dpo_beta, (int, float)) or not (
            math.isfinite(dpo_beta) and dpo_beta > 0):
        raise UsageError(f"--dpo-beta must be a positive number, got {dpo_beta!r}")
