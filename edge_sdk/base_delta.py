"""Dense deltas added to frozen base layers (FedEx-LoRA's exact-aggregation residual).

FedEx-LoRA folds ``scaling * (mean(B_i A_i) - mean(B) mean(A))`` into the frozen weight W0.
The base may be quantised to 4 bits, where adding a small dense delta to the stored weight
would be lost in rounding, so the delta is kept in fp32 beside the layer and added to its
output: ``W0 x + delta x`` is the same function as ``(W0 + delta) x``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

_ATTRIBUTE = "fedvlm_base_delta"


def _add_delta(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    delta = getattr(module, _ATTRIBUTE, None)
    if delta is None:
        return output
    (x,) = args[:1]
    return output + F.linear(x.to(delta.dtype), delta).to(output.dtype)


def set_base_deltas(peft_model: torch.nn.Module, deltas: Mapping[str, np.ndarray]) -> None:
    """Replace the dense delta of each named LoRA-adapted module (module path -> [out, in]).

    Hooks the module's frozen ``base_layer``; a second call replaces, never stacks, deltas.
    """
    for module_path, array in deltas.items():
        try:
            lora_layer = peft_model.get_submodule(module_path)
        except AttributeError as exc:
            raise KeyError(f"base delta names module {module_path!r}, which this model does not have") from exc
        base_layer = getattr(lora_layer, "base_layer", lora_layer)
        expected = (base_layer.out_features, base_layer.in_features)
        if tuple(array.shape) != expected:
            raise ValueError(f"base delta for {module_path!r} has shape {tuple(array.shape)}, expected {expected}")
        device = next(lora_layer.parameters()).device
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
        if getattr(base_layer, _ATTRIBUTE, None) is None:
            base_layer.register_forward_hook(_add_delta)
        # A plain attribute, not a buffer: it must not appear in the model's state dict.
        object.__setattr__(base_layer, _ATTRIBUTE, tensor)


def base_deltas(peft_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The deltas currently applied, by LoRA-adapted module path."""
    found = {}
    for name, module in peft_model.named_modules():
        delta = getattr(module, _ATTRIBUTE, None)
        if delta is not None and name.endswith(".base_layer"):
            found[name[: -len(".base_layer")]] = delta.cpu().numpy().copy()
    return found
