"""pLoRA: personalised federated LoRA, the FedVLM default."""

from __future__ import annotations

from typing import ClassVar

from .base import Strategy


class PLoRA(Strategy):
    """Personalised LoRA: share lora_B, keep lora_A on the device.

    Each adapted layer computes ``W0 x + scaling * B_global A_personal x``. Clients train
    both factors; only B leaves the device and the hub returns the weighted mean of the
    B's (weights: sample counts). A is the personal part and never leaves the device.

    Reference: A. Mitra et al., "FedVLM: Scalable Personalized Vision-Language Models
    through Federated Learning", ECAI 2025, arXiv:2507.17088.

    Parameters:
        None at construction. ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r,
        which a plain mean of B does not need (it is only checked).
    """

    name: ClassVar[str] = "plora"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"B"})
