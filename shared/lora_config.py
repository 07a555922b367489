"""Where LoRA goes and how big it is: the adapter layout every member of a federation shares.

Pure data (no torch), so the hub can announce it and check that updates match it: the hub
sends ``to_dict()`` in its round configuration and compares ``config_hash()`` with each
update's. The edge turns it into a PEFT ``LoraConfig`` (``fedvlm.edge.adapters``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from fedvlm.shared.usage_error import UsageError
from fedvlm.shared.tensor_codec import config_hash

# Module paths of the text decoder in transformers' VLMs: LLaVA, Qwen2-VL, Gemma 3 and most
# others use `language_model`, Idefics3/SmolVLM `text_model`. Naming it keeps the vision
# tower's own q_proj/k_proj/... out of reach.
_TEXT_DECODER = r"(?:.*\.)?(?:language_model|text_model)\.(?:model\.)?layers\.\d+\.self_attn"
_PROJECTOR = r"(?:.*\.)?multi_modal_projector\.linear_\d+"
# How the factors are initialised from init_seed (fedvlm.edge.adapters). Part of the layout,
# so devices that would start from different factors are refused as another layout.
INIT_SCHEMES = ("seeded-kaiming-v1",)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Where LoRA goes and how big it is (a subset of PEFT's ``LoraConfig``).

    Attributes:
        r: rank of each factor pair.
        alpha: scaling numerator; the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the LoRA branch input.
        target_projections: attention projections of the text decoder to adapt.
        include_projector: also adapt the vision-to-text projector's linears.
        init_seed: seed of the factors' initialisation, fixed per federation.
        init_scheme: how the factors are drawn from that seed (``INIT_SCHEMES``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    include_projector: bool = False
    init_seed: int = 0
    init_scheme: str = INIT_SCHEMES[0]

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UsageError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.target_projections:
            raise UsageError("target_projections is empty: name at least one projection, e.g. q_proj")
        for name in self.target_projections:
            if not name.isidentifier():
                raise UsageError(f"target projection {name!r} is not a module name")
        if self.init_scheme not in INIT_SCHEMES:
            raise UsageError(f"LoRA init scheme {self.init_scheme!r} is unknown to this FedVLM (it knows "
                             f"{', '.join(INIT_SCHEMES)}); upgrade it to join this federation")  # fmt: skip

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def target_regex(self) -> str:
        projections = "|".join(self.target_projections)
        pattern = rf"{_TEXT_DECODER}\.(?:{projections})"
        if self.include_projector:
            pattern = rf"(?:{pattern})|(?:{_PROJECTOR})"
        return rf"^(?:{pattern})$"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["target_projections"] = list(self.target_projections)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoraSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise UsageError(f"unknown LoRA settings {sorted(unknown)}; known: {sorted(fields)}")
        values = dict(data)
        if "target_projections" in values:
            values["target_projections"] = tuple(values["target_projections"])
        return cls(**values)

    def config_hash(self) -> str:
        """Identifies the adapter layout; clients and hub refuse factors of another layout."""
        return config_hash(self.to_dict())
