"""FedIT: standard federated LoRA (FedAvg over both factors)."""

from __future__ import annotations

from typing import ClassVar

from .base import Strategy


class FedIT(Strategy):
    """Standard federated LoRA: share lora_A and lora_B, average each separately.

    The hub returns the weighted means of A and of B. This is inexact: mean(B) @ mean(A)
    differs from mean(B_i @ A_i), the update a FedAvg over full weights would give. No
    tensor is personal, so every client ends the round with the same adapter.

    Reference: J. Zhang et al., "Towards Building the Federated GPT: Federated
    Instruction Tuning", 2023, arXiv:2305.05644 (ICASSP 2024).

    Parameters:
        None at construction. ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r,
        which the means do not need (it is only checked).
    """

    name: ClassVar[str] = "fedit"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"A", "B"})
