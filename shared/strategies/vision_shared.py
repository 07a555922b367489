"""Vision-shared: the vision side's LoRA is federated, the language model's stays on the device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .. import lora_keys
from ..lora_config import LoraSettings, module_part
from ..usage_error import UsageError
from .base import Strategy

_VISION_SIDE = ("vision", "projector")


class VisionShared(Strategy):
    """Share both LoRA factors of the vision tower and the projector; keep every language-model factor personal.

    For federations whose common skill is visual (every client must learn to see something
    the base does not: a new concept, larger counts, relative positions) while what is
    personal is how each client answers (its language, its labels). LoRA on the vision
    tower and the projector changes what the language model is shown: the same pixels
    should mean the same thing for every client, so that part is learned from everyone's
    images and averaged (both factors, as FedIT averages a whole adapter). LoRA on the
    language model turns what is shown into each client's own answers, so no factor of it
    leaves the device: averaging even one factor there mixes the clients' conventions, which
    is what holds pLoRA back under concept shift. It is FedRep's split (a shared
    representation, a personal head) drawn along the VLM's own parts.

    The federation's LoRA settings must adapt the vision side (``parts`` with ``vision``
    and/or ``projector``, e.g. ``--lora-parts language,vision,projector``), or nothing would
    travel. Both sides are trained together in every local step (FedRep trains the head
    first, then the representation).

    Reference: L. Collins, H. Hassani, A. Mokhtari, S. Shakkottai, "Exploiting Shared
    Representations for Personalized Federated Learning" (FedRep), ICML 2021,
    arXiv:2102.07078; K. Pillutla et al., "Federated Learning with Partial Model
    Personalization", ICML 2022, arXiv:2204.03809.

    Parameters:
        shared_parts: the model parts whose LoRA factors are shared, a subset of
            ``vision`` and ``projector`` (default both); every other part is personal.
        language_factors: factors of the language model's LoRA that are shared too, ``"A"``
            or nothing (default). ``"A"`` is FedSA's split on the language side (A, what to
            read, averaged; B, what to write, personal): for federations whose common skill
            is also in how the language model reads the picture (a new wording of a
            question), while the clients' conventions stay in B. ``"B"`` is refused: it is the
            side where the conventions are.
        ``new_aggregator(scaling)`` takes LoRA's lora_alpha / r (only checked).
    """

    name: ClassVar[str] = "vision-shared"
    shared_factors: ClassVar[frozenset[str]] = frozenset({"A", "B"})

    def __init__(self, shared_parts: tuple[str, ...] | list[str] | str = _VISION_SIDE,
                 language_factors: tuple[str, ...] | list[str] | str = ()) -> None:
        parts = (shared_parts,) if isinstance(shared_parts, str) else tuple(shared_parts)
        unknown = [part for part in parts if part not in _VISION_SIDE]
        if not parts or unknown:
            raise UsageError(f"{self.name} option shared_parts must name some of {', '.join(_VISION_SIDE)}, got "
                             f"{shared_parts!r} (the language model's factors are always personal)")  # fmt: skip
        self.shared_parts = tuple(part for part in _VISION_SIDE if part in parts)
        factors = (language_factors,) if isinstance(language_factors, str) else tuple(language_factors)
        if any(factor != "A" for factor in factors):
            raise UsageError(f"{self.name} option language_factors must be A or empty, got {language_factors!r} "
                             "(the language model's B is where each client's answers are written: it stays personal)")
        self.language_factors = tuple(sorted(set(factors)))

    def options(self) -> dict[str, Any]:
        # language_factors only when set, so the layout hash of the plain split stays what it was.
        return {"shared_parts": list(self.shared_parts),
                **({"language_factors": list(self.language_factors)} if self.language_factors else {})}

    def layout_options(self) -> dict[str, Any]:
        return self.options()

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any], lora: LoraSettings) -> dict[str, Any]:
        shared = options.get("shared_parts", _VISION_SIDE)
        shared = (shared,) if isinstance(shared, str) else tuple(shared)
        if lora.target_modules is None and not set(shared) & set(lora.parts):
            raise UsageError(f"{cls.name} shares the LoRA factors of the {' and '.join(shared)}, but the LoRA "
                             f"settings adapt only the {' and '.join(lora.parts)}: adapt the vision side too "
                             "(e.g. --lora-parts language,vision,projector)")  # fmt: skip
        return dict(options)

    def shared_description(self) -> str:
        language = " and the language model's lora_A tensors" if self.language_factors else ""
        return f"the lora_A and lora_B tensors of the {' and '.join(self.shared_parts)}{language}"

    def shared_rank(self, key: str, rank: int) -> int:
        factor = lora_keys.factor_of(key)
        if factor is None:
            return 0
        part = module_part(lora_keys.module_of(key))
        if part in self.shared_parts:
            return rank
        return rank if part == "language" and factor in self.language_factors else 0
