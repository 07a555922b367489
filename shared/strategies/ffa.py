"""FFA-LoRA: federated LoRA with lora_A frozen at a shared initialisation."""

from __future__ import annotations

from typing import ClassVar

from .base import Strategy


class FFALoRA(Strategy):
    """Freeze lora_A at the federation's shared seed initialisation; train and share lora_B only.

    Since every client has the same fixed A, mean(B_i) @ A == mean(B_i @ A): averaging B
    is exact. ``frozen_factors == {"A"}`` tells the edge not to train A; A never leaves the
    device, but it is identical everywhere because all clients initialise from the seed
    the hub announces.

    Reference: Y. Sun, Z. Li, Y. Li, B. Ding, "Improving LoRA in Privacy-preserving
    Federated Learning", ICLR 2024, arXiv:2403.12313.

    Parameters:
        None at construction. ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r,
        which the mean of B does not need (it is only checked).
    """

    name: ClassVar[str] = "ffa"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"B"})
    frozen_factors: ClassVar[frozenset[str]] = frozenset({"A"})
