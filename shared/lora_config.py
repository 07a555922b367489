"""Where LoRA goes and how big it is: the adapter layout every member of a federation shares.

Pure data (no torch), so the hub can announce it and check that updates match it: the hub
sends ``to_dict()`` in its round configuration and compares ``config_hash()`` with each
update's. The edge turns it into a PEFT ``LoraConfig`` (``fedvlm.edge.adapters``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from fedvlm.shared.usage_error import UsageError
from fedvlm.shared.tensor_codec import config_hash

# Which part of a VLM a module belongs to, by the attribute names transformers' VLM families
# give their parts (LLaVA*, PaliGemma, Gemma 3, InternVL: vision_tower / multi_modal_projector
# / language_model; Qwen2-VL and 2.5-VL: visual with its merger; Idefics3, SmolVLM:
# vision_model / connector / text_model; Mllama: vision_model / multi_modal_projector /
# language_model). The deepest match wins: Qwen's merger sits inside its vision tower.
PARTS: dict[str, tuple[str, ...]] = {
    "language": ("language_model", "text_model"),
    "vision": ("vision_tower", "visual", "vision_model"),
    "projector": ("multi_modal_projector", "connector", "merger"),
}
LAYER_KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn", "cross_attn", "attn", "attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}
# SigLIP towers carry an attention-pooling head that VLMs never run: adapting it would only
# send factors that never change.
_UNUSED_VISION_CHILDREN = ("head",)
# How the factors are initialised from init_seed (fedvlm.edge.adapters). Part of the layout,
# so devices that would start from different factors are refused as another layout.
INIT_SCHEMES = ("seeded-kaiming-v1",)


def module_part(module_name: str) -> str | None:
    """``language``, ``vision`` or ``projector`` for a module's dotted name, None outside them."""
    components = module_name.split(".")
    for component in reversed(components):
        for part, names in PARTS.items():
            if component in names:
                return part
    return None


def layer_kind(module_name: str) -> str | None:
    """``attention`` or ``mlp`` for a linear layer's dotted name, None for anything else."""
    components = module_name.split(".")
    for kind, names in LAYER_KINDS.items():
        if any(component in names for component in components):
            return kind
    return None


def _in_unused_vision_child(module_name: str) -> bool:
    components = module_name.split(".")
    for index, component in enumerate(components[:-1]):
        if component in PARTS["vision"] and components[index + 1] in _UNUSED_VISION_CHILDREN:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Where LoRA goes and how big it is (a subset of PEFT's ``LoraConfig``).

    The layers to adapt are chosen by the part of the model they belong to and their kind,
    so one setting means the same thing on every family (see :data:`PARTS`); the default
    is the language model's attention and MLP projections, which is where instruction
    tuning of a VLM usually happens. ``target_modules`` overrides both with a regex over
    full module names, for models or layouts the parts do not describe.

    Attributes:
        r: rank of each factor pair.
        alpha: scaling numerator; the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the LoRA branch input.
        parts: which parts of the VLM to adapt: ``language``, ``vision``, ``projector``.
        layers: which linear layers of the language model and vision tower: ``attention``
            (query, key, value, output projections) and/or ``mlp``. The projector's linears
            are all adapted when it is chosen.
        target_modules: a regular expression that full module names must match, instead of
            ``parts`` and ``layers`` (PEFT's ``target_modules`` as a regex).
        init_seed: seed of the factors' initialisation, fixed per federation.
        init_scheme: how the factors are drawn from that seed (``INIT_SCHEMES``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    parts: tuple[str, ...] = ("language",)
    layers: tuple[str, ...] = ("attention", "mlp")
    target_modules: str | None = None
    init_seed: int = 0
    init_scheme: str = INIT_SCHEMES[0]

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UsageError(f"LoRA rank r must be >= 1, got {self.r}")
        _check_choices("parts", self.parts, PARTS)
        _check_choices("layers", self.layers, LAYER_KINDS)
        if self.target_modules is not None:
            if not self.target_modules.strip():
                raise UsageError("LoRA target_modules is empty: give a regex over module names, or leave it unset")
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise UsageError(f"LoRA target_modules {self.target_modules!r} is not a valid regex: {exc}") from None
        if self.init_scheme not in INIT_SCHEMES:
            raise UsageError(f"LoRA init scheme {self.init_scheme!r} is unknown to this FedVLM (it knows "
                             f"{', '.join(INIT_SCHEMES)}); upgrade it to join this federation")  # fmt: skip

    def selects(self, module_name: str) -> bool:
        """Whether the linear layer ``module_name`` gets LoRA factors."""
        if self.target_modules is not None:
            return re.fullmatch(self.target_modules, module_name) is not None
        part = module_part(module_name)
        if part not in self.parts:
            return False
        if part == "projector":
            return True
        if part == "vision" and _in_unused_vision_child(module_name):
            return False
        return layer_kind(module_name) in self.layers

    def describe(self) -> str:
        """What is adapted, in words (for errors and logs)."""
        if self.target_modules is not None:
            return f"modules matching {self.target_modules!r}"
        layers = " and ".join(self.layers)
        parts = [f"{p} {layers}" if p != "projector" else "projector" for p in self.parts]
        return ", ".join(parts)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["parts"], data["layers"] = list(self.parts), list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoraSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        replaced = {"target_projections", "include_projector"} & set(data)
        if replaced:
            raise UsageError(f"LoRA settings {sorted(replaced)} were replaced by 'parts' (language, vision, projector), "
                             "'layers' (attention, mlp) and 'target_modules' (a regex over module names)")
        unknown = set(data) - fields
        if unknown:
            raise UsageError(f"unknown LoRA settings {sorted(unknown)}; known: {sorted(fields)}")
        values = dict(data)
        for name in ("parts", "layers"):
            if name in values:
                if isinstance(values[name], str) or not isinstance(values[name], (list, tuple)):
                    raise UsageError(f"LoRA {name} must be a list, e.g. {list(getattr(cls, name))}")
                values[name] = tuple(values[name])
        return cls(**values)

    def config_hash(self) -> str:
        """Identifies the adapter layout; clients and hub refuse factors of another layout."""
        return config_hash(self.to_dict())


def _check_choices(field: str, chosen: tuple[str, ...], known: Mapping[str, object]) -> None:
    if not chosen:
        raise UsageError(f"LoRA {field} is empty: choose from {', '.join(known)}")
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise UsageError(f"LoRA {field}: {unknown[0]!r} is not one of {', '.join(known)}")
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"LoRA {field} names one twice: {list(chosen)}")
