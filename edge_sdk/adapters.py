"""pLoRA adapters on a frozen (quantised) base, through PEFT.

Which linear layers get factors comes from the model's structure
(:meth:`~fedvlm.shared.lora_config.LoraSettings.selects`: by default the language model's
attention and MLP projections, the vision tower and projector as options), resolved here
to the exact module names PEFT adapts. All clients of a federation build their factors
from the same seed, so their B's live in compatible bases.

Adapter tensors are exchanged as ``dict[str, np.ndarray]`` keyed by PEFT's own state-dict
names (``get_peft_model_state_dict``), which is what ``fedvlm.shared`` splits and averages.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from typing import Iterable, Mapping

import numpy as np
import torch

from fedvlm.edge.torch_stack import check_torch_stack

check_torch_stack()  # before peft imports transformers: a broken torchvision is one clear error, not theirs
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedvlm.edge.errors import LoraTargetError
from fedvlm.shared.lora_config import LoraSettings, module_part
from fedvlm.shared.lora_keys import factor_of

__all__ = ["LoraSettings", "attach_lora", "adapter_state", "load_adapter_state", "lora_target_modules"]

_INIT_LOCK = threading.Lock()


def attach_lora(
    model: torch.nn.Module, settings: LoraSettings, *, frozen_factors: Iterable[str] = (), rank: int | None = None
) -> PeftModel:
    """Wrap ``model`` with LoRA factors initialised from ``settings.init_seed``.

    ``frozen_factors`` ("A" and/or "B") stay at their initial values (FFA-LoRA freezes A).
    ``rank`` below ``settings.r`` gives a device of lower rank in a federation of rank r
    (strategies with heterogeneous ranks): its factors are the leading block of the
    federation's initialisation, and its scaling is the federation's ``alpha / r``.
    """
    rank = settings.r if rank is None else rank
    if not 1 <= rank <= settings.r:
        raise ValueError(f"a device's LoRA rank must be between 1 and the federation's r={settings.r}, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=settings.alpha * rank / settings.r if rank != settings.r else settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_modules(model, settings),
        bias="none",
    )
    # PEFT draws its own initial factors from torch's process-wide RNG (replaced below):
    # fork_rng leaves the caller's RNG stream as it was. The lock: that RNG state and the
    # warning filters are process-wide, so two devices set up at once in one process
    # (threads) would restore each other's RNG state and slip past each other's filter.
    with _INIT_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT calls a transformers API that transformers 5 deprecates; nothing for a user to do.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    _initialise_factors(peft_model, settings.init_seed, settings.r)
    frozen = set(frozen_factors)
    for name, parameter in peft_model.named_parameters():
        factor = factor_of(name)
        parameter.requires_grad_(factor is not None and factor not in frozen)
    return peft_model


def lora_target_modules(model: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """The full names of the linear layers ``settings`` adapts in ``model``.

    Every part the settings name must hold at least one such layer: a part that silently
    adapted nothing would make a layout that means different things on different families.
    """
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and settings.selects(name)]  # fmt: skip
    found_parts = {module_part(name) for name in names}
    empty = [] if settings.target_modules is not None else [p for p in settings.parts if p not in found_parts]
    if not names or empty:
        what = f"its {' and '.join(empty)}" if empty else "it"
        raise LoraTargetError(
            f"the LoRA targets ({settings.describe()}) select no linear layer in {what}: this "
            f"{type(model).__name__} has none there. FedVLM finds a VLM's parts by transformers' names "
            "(language_model/text_model, vision_tower/visual/vision_model, multi_modal_projector/connector/"
            "merger); choose other --lora-parts, or name the layers with --lora-target-modules REGEX"
        )
    return names


def _initialise_factors(peft_model: PeftModel, seed: int, federation_rank: int) -> None:
    """PEFT's default LoRA initialisation (A Kaiming-uniform with a = √5, i.e. uniform in
    ±1/√in_features; B zero), drawn from a generator of the federation's seed rather than
    torch's process-wide RNG: every device gets the same factors, even while other threads
    of its process draw random numbers (training, dropout). A is drawn at the federation's
    rank, so a device of lower rank holds its leading rows.

    This is ``LoraSettings.init_scheme`` "seeded-kaiming-v1": change the draws only under a
    new scheme name, or devices of one federation would start from different factors.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
            factor = factor_of(name)
            if factor is not None and parameter.dim() != 2:
                raise ValueError(f"{name} is not a linear layer's LoRA factor ({tuple(parameter.shape)}); FedVLM "
                                 "adapts linear projections only")  # fmt: skip
            if factor == "B":
                parameter.zero_()
            elif factor == "A":
                bound = 1.0 / math.sqrt(parameter.shape[1])
                # Drawn on the CPU, so the numbers are the same whatever device the model is on.
                values = torch.empty((federation_rank, parameter.shape[1]), dtype=torch.float32)
                values.uniform_(-bound, bound, generator=generator)
                parameter.copy_(values[: parameter.shape[0]])


def adapter_state(peft_model: PeftModel) -> dict[str, np.ndarray]:
    """All LoRA factors as fp32 numpy arrays, keyed by PEFT's state-dict names."""
    state = _factor_views(peft_model) or get_peft_model_state_dict(peft_model)
    return {name: tensor.detach().to("cpu", torch.float32).numpy().copy() for name, tensor in state.items()}


# PEFT's state dict of a model, when every tensor in it is a view of one of the model's
# parameters: then loading a state is a copy into those views. PEFT rebuilds the dict and
# re-keys it on every call (~40 ms on the small model), and a simulation swaps adapter states
# a hundred times per run. Keyed weakly by the model; rebuilt when its parameters change.
_VIEWS: "weakref.WeakKeyDictionary[PeftModel, tuple[tuple[int, ...], dict[str, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()


def _factor_views(peft_model: PeftModel) -> dict[str, torch.Tensor] | None:
    """PEFT's state-dict names -> views of the parameters they are (None when they are not views)."""
    pointers = tuple(p.data_ptr() for p in peft_model.parameters())
    cached = _VIEWS.get(peft_model)
    if cached is None or cached[0] != pointers:
        state = get_peft_model_state_dict(peft_model)
        owned = set(pointers)
        views = state if all(t.data_ptr() in owned for t in state.values()) else None
        _VIEWS[peft_model] = cached = (pointers, views)
    return cached[1]


def load_adapter_state(peft_model: PeftModel, tensors: Mapping[str, np.ndarray]) -> None:
    """Load some or all LoRA factors; names and shapes must match the model's exactly."""
    views = _factor_views(peft_model)
    current = views or get_peft_model_state_dict(peft_model)
    for name, array in tensors.items():
        if name not in current:
            raise KeyError(f"adapter tensor {name!r} does not exist in this model's LoRA layout")
        if tuple(array.shape) != tuple(current[name].shape):
            raise ValueError(
                f"adapter tensor {name!r} has shape {tuple(array.shape)}, the model expects "
                f"{tuple(current[name].shape)}"
            )
    if views is not None:
        with torch.no_grad():
            for name, array in tensors.items():
                views[name].copy_(torch.from_numpy(np.array(array, dtype=np.float32)))
        return
    device = next(peft_model.parameters()).device
    # Copies: decoded tensors are read-only views of the received bytes (tensor_codec.decode),
    # which torch must not share (it warns, and could write into them).
    as_torch = {name: torch.from_numpy(np.array(a, dtype=np.float32)).to(device) for name, a in tensors.items()}
    result = set_peft_model_state_dict(peft_model, as_torch)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"PEFT did not load {sorted(unexpected)[:3]}")
