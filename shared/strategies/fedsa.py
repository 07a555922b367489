"""FedSA-LoRA: share lora_A, keep lora_B personal."""

from __future__ import annotations

from typing import ClassVar

from .base import Strategy


class FedSALoRA(Strategy):
    """Share lora_A (general knowledge), keep lora_B on the device (client-specific knowledge).

    The hub returns the weighted mean of the A's; each client keeps its own B. This is
    the mirror image of pLoRA.

    Reference: P. Guo, S. Zeng, Y. Wang, H. Fan, F. Wang, L. Qu, "Selective Aggregation
    for Low-Rank Adaptation in Federated Learning", ICLR 2025, arXiv:2410.01463.

    Parameters:
        None at construction. ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r,
        which the mean of A does not need (it is only checked).
    """

    name: ClassVar[str] = "fedsa"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"A"})
