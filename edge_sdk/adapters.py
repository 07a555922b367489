"""pLoRA adapters on a frozen (quantised) base, through PEFT.

LoRA goes on the language model's attention projections (and, optionally, the
vision-to-text projector). The target regex names the language model explicitly, so the
vision tower's own ``q_proj``/``k_proj``/... are never adapted. All clients of a federation
build their factors from the same seed, so their B's live in compatible bases.

Adapter tensors are exchanged as ``dict[str, np.ndarray]`` keyed by PEFT's own state-dict
names (``get_peft_model_state_dict``), which is what ``fedvlm.shared`` splits and averages.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedvlm.shared.lora_keys import factor_of

# Module paths of the text decoder in transformers' VLMs: LLaVA, Qwen2-VL, Gemma 3 and most
# others use `language_model`, Idefics3/SmolVLM `text_model`.
_TEXT_DECODER = r"(?:.*\.)?(?:language_model|text_model)\.(?:model\.)?layers\.\d+\.self_attn"
_PROJECTOR = r"(?:.*\.)?multi_modal_projector\.linear_\d+"


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
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    include_projector: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.target_projections:
            raise ValueError("target_projections is empty: name at least one projection, e.g. q_proj")
        for name in self.target_projections:
            if not name.isidentifier():
                raise ValueError(f"target projection {name!r} is not a module name")

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
            raise ValueError(f"unknown LoRA settings {sorted(unknown)}; known: {sorted(fields)}")
        values = dict(data)
        if "target_projections" in values:
            values["target_projections"] = tuple(values["target_projections"])
        return cls(**values)

    def config_hash(self) -> str:
        """Identifies the adapter layout; clients and hub refuse factors of another layout."""
        from fedvlm.shared.tensor_codec import config_hash

        layout = {k: v for k, v in self.to_dict().items()}
        return config_hash(layout)


def attach_lora(
    model: torch.nn.Module, settings: LoraSettings, *, frozen_factors: Iterable[str] = ()
) -> PeftModel:
    """Wrap ``model`` with LoRA factors initialised from ``settings.init_seed``.

    ``frozen_factors`` ("A" and/or "B") stay at their initial values (FFA-LoRA freezes A).
    """
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_regex(),
        bias="none",
    )
    # Same seed, same factors on every client, whatever the process's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        peft_model = get_peft_model(model, config)
    if not any(factor_of(name) for name, _ in peft_model.named_parameters()):
        raise ValueError(
            f"no module matched the LoRA target regex {settings.target_regex()!r}: is this a "
            "vision-language model with a text decoder named language_model or text_model?"
        )
    frozen = set(frozen_factors)
    for name, parameter in peft_model.named_parameters():
        factor = factor_of(name)
        parameter.requires_grad_(factor is not None and factor not in frozen)
    return peft_model


def adapter_state(peft_model: PeftModel) -> dict[str, np.ndarray]:
    """All LoRA factors as fp32 numpy arrays, keyed by PEFT's state-dict names."""
    state = get_peft_model_state_dict(peft_model)
    return {name: tensor.detach().to("cpu", torch.float32).numpy().copy() for name, tensor in state.items()}


def load_adapter_state(peft_model: PeftModel, tensors: Mapping[str, np.ndarray]) -> None:
    """Load some or all LoRA factors; names and shapes must match the model's exactly."""
    current = get_peft_model_state_dict(peft_model)
    for name, array in tensors.items():
        if name not in current:
            raise KeyError(f"adapter tensor {name!r} does not exist in this model's LoRA layout")
        if tuple(array.shape) != tuple(current[name].shape):
            raise ValueError(
                f"adapter tensor {name!r} has shape {tuple(array.shape)}, the model expects "
                f"{tuple(current[name].shape)}"
            )
    device = next(peft_model.parameters()).device
    as_torch = {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device) for name, a in tensors.items()}
    result = set_peft_model_state_dict(peft_model, as_torch)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"PEFT did not load {sorted(unexpected)[:3]}")


def describe(settings: LoraSettings) -> str:
    return json.dumps(settings.to_dict(), sort_keys=True)
