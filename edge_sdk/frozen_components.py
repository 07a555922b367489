"""Hold some rank components of the LoRA factors where they are while the others train.

A strategy's shared and personal parts are whole factors (pLoRA: B and A) or rank slices
of them (a rank split, FedDPA's two adapters). Training one part alone means freezing the
other: a whole factor simply stops requiring gradients; a slice of one has its gradient
zeroed by a hook (so neither clipping nor the optimiser sees it) and its values restored
afterwards (weight decay would otherwise still move it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from fedvlm.shared.lora_keys import rank_axis

__all__ = ["frozen_components"]

# (PEFT state-dict key, rank) -> the rank components to hold, as (start, stop), or None.
Pick = Callable[[str, int], "tuple[int, int] | None"]


@contextlib.contextmanager
def frozen_components(peft_model: torch.nn.Module, pick: Pick) -> Iterator[None]:
    """Within the block, the components ``pick`` names of every trainable LoRA factor do not change."""
    whole: list[torch.nn.Parameter] = []
    hooks, saved = [], []
    for name, parameter in peft_model.named_parameters():
        key = name.replace(".default", "")  # PEFT's state-dict name of the parameter
        axis = rank_axis(key)
        if axis is None or not parameter.requires_grad:
            continue
        rank = parameter.shape[axis]
        span = pick(key, rank)
        if span is None or span[0] >= span[1]:
            continue
        if span == (0, rank):
            whole.append(parameter)
            continue
        index = [slice(None)] * parameter.dim()
        index[axis] = slice(*span)
        index = tuple(index)
        saved.append((parameter, index, parameter.detach()[index].clone()))
        mask = torch.ones_like(parameter)
        mask[index] = 0
        hooks.append(parameter.register_hook(lambda grad, mask=mask: grad * mask))
    for parameter in whole:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for parameter in whole:
            parameter.requires_grad_(True)
        with torch.no_grad():
            for parameter, index, value in saved:
                parameter[index] = value
