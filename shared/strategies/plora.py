"""pLoRA: personalised federated LoRA, the FedVLM default."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import Strategy, option_count, option_number


class PLoRA(Strategy):
    """Personalised LoRA: share lora_B, keep lora_A on the device.

    Each adapted layer computes ``W0 x + scaling * B_global A_personal x``. Clients train
    both factors; only B leaves the device and the hub returns the weighted mean of the
    B's (weights: sample counts). A is the personal part and never leaves the device.

    Three options may make it stronger without changing what travels (all off by default,
    so pLoRA is exactly the paper's method and every strategy trains alike):

    - ``refit_steps``: after a device absorbs the global B of a round it took part in, it
      trains its A alone (B frozen) for this many steps, taken from the round's local
      steps, so A fits the B it will be used with. Same compute, same bytes.
    - ``personal_lr_scale``: A's learning rate as a multiple of the round's (per-factor
      learning rates, as LoRA+ does for B; here A is the client's own part).
    - ``shared_lr_scale``: B's learning rate as a multiple of the round's (LoRA+: B, which
      starts at zero, learns faster than A; here B is also the part the clients pool).

    Reference: A. Mitra et al., "FedVLM: Scalable Personalized Vision-Language Models
    through Federated Learning", ECAI 2025, arXiv:2507.17088. Per-factor learning rates:
    S. Hayou, N. Ghosh, B. Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
    ICML 2024, arXiv:2402.12354.

    Parameters:
        refit_steps: steps of each round spent refitting A after the global B arrives
            (default 0: none). Must be below the round's local steps.
        personal_lr_scale: multiplier of A's learning rate (default 1.0).
        shared_lr_scale: multiplier of B's learning rate (default 1.0).
        ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r, which a plain mean of B
        does not need (it is only checked).
    """

    name: ClassVar[str] = "plora"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"B"})

    def __init__(self, refit_steps: int = 0, personal_lr_scale: float = 1.0, shared_lr_scale: float = 1.0) -> None:
        self.refit_steps = option_count(self.name, "refit_steps", refit_steps, minimum=0)
        self.personal_lr_scale = option_number(self.name, "personal_lr_scale", personal_lr_scale)
        self.shared_lr_scale = option_number(self.name, "shared_lr_scale", shared_lr_scale)

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"refit_steps": self.refit_steps, "personal_lr_scale": self.personal_lr_scale}
        # Announced only when set: a hub running the paper's pLoRA announces what it did before
        # this option existed, so devices whose SDK predates it still join.
        if self.shared_lr_scale != 1:
            options["shared_lr_scale"] = self.shared_lr_scale
        return options
