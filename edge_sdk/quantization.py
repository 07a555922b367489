"""Quantisation of the frozen base model (bitsandbytes NF4 or int8, or none).

Only the frozen base is quantised; the LoRA factors stay in fp32 and train. The default
depends on the device (:func:`default_quantization`):

* CUDA: ``nf4``. GPU memory is what limits an edge GPU, NF4 weights take ~1/7 of fp32
  and bitsandbytes' CUDA kernels keep the step time close to fp16.
* CPU: ``none`` while the fp32 weights fit comfortably in memory (under a quarter of the
  RAM), ``nf4`` beyond. On the CPU, NF4 saves the same memory but every forward pays for
  dequantisation (measured: step time up to 1.5x fp32), so it only pays when memory binds.
"""

from __future__ import annotations

from fedvlm.edge.errors import QuantizationError

import os
from typing import Literal

import torch

from fedvlm.shared.lora_config import module_part

QuantizationMode = Literal["none", "nf4", "int8"]
QUANTIZATION_MODES: tuple[str, ...] = ("none", "nf4", "int8")

# bitsandbytes quantises in blocks of 64 input features; its CPU kernels need whole blocks.
NF4_BLOCK = 64




def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_quantization(device: torch.device, fp32_weight_bytes: int) -> QuantizationMode:
    """The quantisation FedVLM picks when the user does not choose (see module docstring)."""
    if device.type == "cuda":
        return "nf4"
    return "nf4" if fp32_weight_bytes > total_memory_bytes() // 4 else "none"


def check_mode(mode: str) -> QuantizationMode:
    if mode not in QUANTIZATION_MODES:
        raise QuantizationError(
            f"unknown quantisation {mode!r}; choose one of {', '.join(QUANTIZATION_MODES)} (or 'auto')"
        )
    return mode  # type: ignore[return-value]


def modules_to_keep_full_precision(model_on_meta: torch.nn.Module) -> list[str]:
    """Modules that must stay unquantised.

    Only the language model is quantised: it holds most of the weights. The vision tower
    and the projector stay in full precision (vision encoders lose more accuracy to 4 bits,
    for little memory; every family's QLoRA recipe keeps them), as do the output head
    (its rows are the vocabulary) and any linear whose input width is not a whole number
    of quantisation blocks. A model whose language model FedVLM cannot find is quantised
    everywhere but its output head.
    """
    keep = {"lm_head"}
    linears = [(name, module) for name, module in model_on_meta.named_modules() if isinstance(module, torch.nn.Linear)]
    finds_language = any(module_part(name) == "language" for name, _ in linears)
    for name, module in linears:
        if module.in_features % NF4_BLOCK != 0:
            keep.add(name)
        elif finds_language and module_part(name) != "language":
            keep.add(_part_root(name))
    return sorted(keep)


def _part_root(module_name: str) -> str:
    """The module a part starts at (``model.vision_tower`` for any layer inside it); the name
    itself for a module outside every part."""
    components = module_name.split(".")
    for index, component in enumerate(components):
        if module_part(component) is not None:
            return ".".join(components[: index + 1])
    return module_name


def bitsandbytes_config(mode: QuantizationMode, keep_full_precision: list[str]):
    """A transformers ``BitsAndBytesConfig`` for ``mode`` (None for ``none``)."""
    if mode == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (fail here, with advice, not deep in from_pretrained)
    except ImportError as exc:
        raise QuantizationError(
            f"quantisation {mode!r} needs bitsandbytes: pip install 'fedvlm[edge]' "
            "or pass --quantization none"
        ) from exc
    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            # LoRA factors and activations stay fp32: the adapters are what we train.
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=keep_full_precision,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_full_precision)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers as stored (quantised or not)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None:
            # NF4 keeps its block scales outside the parameter.
            for value in quant_state.as_dict(packed=False).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total
