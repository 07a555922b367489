"""FedDPA: a federated global adapter and a personal one, weighed per input at inference."""

from __future__ import annotations

from typing import Any, ClassVar

from ..usage_error import UsageError
from .base import option_count, option_number
from .rank_split import RankSplit

# How an input is represented for its weight: the last hidden state at the prompt's last
# token, or averaged over the prompt (FedDPA's code: emb_type "last", "avg").
REPRESENTATIONS = ("last", "mean")
# How a similarity becomes the personal weight: the paper's ``max_personal_weight * cos``, or that
# cosine relative to how alike the device's own training prompts are (see ``weighting``).
WEIGHTINGS = ("cosine", "relative")


class FedDPA(RankSplit):
    """Dual-personalising adapter: a global LoRA adapter learned by the federation and a personal
    one that stays on the device, combined per input.

    The two adapters are the two rank slices of one LoRA adapter of rank r: the first
    ``global_rank`` components are the global adapter (both factors shared, averaged by the
    hub like FedIT averages a whole adapter), the rest the personal one. On the wire this is
    ``RankSplit``; on the device it is not:

        h = W0 x + scaling * ((1 - w) B_g A_g x + w B_p A_p x)

    - at inference the personal weight ``w`` is set per input (FedDPA's instance-wise dynamic
      weighting): ``w(x) = max_personal_weight * cos(rep(x), reference)``, where the reference
      is the mean of the normalised representations of the device's training prompts, so an
      input like the device's own data leans on the personal adapter and an unfamiliar one on
      the global adapter (``fedvlm.edge.dual_adapter``: rep is the language model's last
      hidden state under the personal adapter, see ``representation``);
    - local training is FedDPA-T's: the global adapter alone for the round's local steps
      (personal one frozen and, by default, off: ``global_phase_personal_weight``), then the
      personal adapter for as many (global one frozen), the two mixed at
      ``training_personal_weight``; so a round costs a device twice the optimiser steps of the
      single-adapter strategies (the paper's clients train each adapter for the local epochs, the
      global one as plain federated LoRA).

    How it differs from ``rank-split``: a rank split adds its two parts with fixed weight 1
    and trains them together; FedDPA trains them in turn and weighs them per input, which no
    fixed rank split computes. With ``max_personal_weight`` and ``training_personal_weight``
    both 0.5 and inputs identical to the training data (cos = 1), the two differ only in the
    training schedule and a common factor 0.5.

    Reference: Y. Yang, G. Long, T. Shen, J. Jiang, M. Blumenstein, "Dual-Personalizing
    Adapter for Federated Foundation Models", NeurIPS 2024, arXiv:2403.19211 (code:
    github.com/Lydia-yang/FedDPA; FDLoRA, Qi et al. 2024, arXiv:2406.07925, fuses a global
    and a personal LoRA with weights fitted per client instead).

    Parameters:
        global_rank: rank components of the global adapter, at least 1 and below the
            federation's LoRA rank r (default None: r // 2, filled in by ``build_strategy``).
        max_personal_weight: the personal weight of an input identical to the reference
            (default 0.5, the paper's code's).
        training_personal_weight: the personal weight while the personal adapter trains, and
            before a device has a reference (default 0.5: the two adapters at equal weight).
        global_phase_personal_weight: the personal weight while the global adapter trains
            (default 0: the global adapter alone, as the paper's clients train it; 0.5 with the
            default ``training_personal_weight`` is this project's schedule before, under which
            the global adapter learnt only to be half of a pair with each client's personal one).
        reference_examples: training prompts whose representations make the reference
            (default 16).
        representation: ``last`` (default, the paper code's: the last hidden state at the
            prompt's last token) or ``mean`` (averaged over the prompt, its ``avg``).
        weighting: ``cosine`` (default, the paper's: ``w = max_personal_weight * cos``) or
            ``relative``: ``w = max_personal_weight * clip(cos / c, 0, 1)``, with ``c`` the mean
            cosine between two of the device's own training prompts, so an input as like the
            device's data as its data is alike gets the full weight (the paper's formula assumes
            that is a cosine near 1; on a small model it is far below, see
            ``fedvlm.edge.dual_adapter``).
        ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r (only checked).
    """

    name: ClassVar[str] = "feddpa"

    def __init__(self, global_rank: int | None = None, max_personal_weight: float = 0.5,
                 training_personal_weight: float = 0.5, reference_examples: int = 16,
                 representation: str = "last", global_phase_personal_weight: float = 0.0,
                 weighting: str = "cosine") -> None:  # fmt: skip
        super().__init__(shared_rank=global_rank)
        if representation not in REPRESENTATIONS:
            raise UsageError(f"{self.name} option representation must be one of {', '.join(REPRESENTATIONS)}, got "
                             f"{representation!r}")  # fmt: skip
        self.representation = representation
        if weighting not in WEIGHTINGS:
            raise UsageError(f"{self.name} option weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        self.max_personal_weight = option_number(self.name, "max_personal_weight", max_personal_weight, high=1.0,
                                                 low_inclusive=True)  # fmt: skip
        self.training_personal_weight = option_number(self.name, "training_personal_weight",
                                                      training_personal_weight, high=1.0)  # fmt: skip
        self.global_phase_personal_weight = option_number(self.name, "global_phase_personal_weight",
                                                          global_phase_personal_weight, high=1.0,
                                                          low_inclusive=True)  # fmt: skip
        self.reference_examples = option_count(self.name, "reference_examples", reference_examples, minimum=1)

    @property
    def global_rank(self) -> int | None:
        return self.shared_rank_count

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "global_rank": self.global_rank, "max_personal_weight": self.max_personal_weight,
            "training_personal_weight": self.training_personal_weight, "reference_examples": self.reference_examples,
            "representation": self.representation,
            # Always announced: its default changed the schedule, so a device whose SDK predates
            # it (and would train the global adapter mixed) is refused by name, not mixed in.
            "global_phase_personal_weight": self.global_phase_personal_weight}  # fmt: skip
        if self.weighting != "cosine":  # announced only when set: the paper's weighting needs no new SDK
            options["weighting"] = self.weighting
        return options

    def layout_options(self) -> dict[str, Any]:
        return {"global_rank": self.global_rank}

    @classmethod
    def _rank_option(cls) -> str:
        return "global_rank"
