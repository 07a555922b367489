"""pLoRA adapters on a frozen (quantised) base, through PEFT.

LoRA goes on the language model's attention projections (and, optionally, the
vision-to-text projector). The target regex names the language model explicitly, so the
vision tower's own ``q_proj``/``k_proj``/... are never adapted. All clients of a federation
build their factors from the same seed, so their B's live in compatible bases.

Adapter tensors are exchanged as ``dict[str, np.ndarray]`` keyed by PEFT's own state-dict
names (``get_peft_model_state_dict``), which is what ``fedvlm.shared`` splits and averages.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Iterable, Mapping

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.lora_keys import factor_of

__all__ = ["LoraSettings", "attach_lora", "adapter_state", "load_adapter_state"]

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
        target_modules=settings.target_regex(),
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
