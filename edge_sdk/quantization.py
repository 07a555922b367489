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
    """Linear layers that must stay unquantised.

    The output head (its rows are the vocabulary: quantising it costs accuracy for little
    memory) and any linear whose input width is not a whole number of quantisation blocks.
    """
    keep = {"lm_head"}
    for name, module in model_on_meta.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features % NF4_BLOCK != 0:
            keep.add(name)
    return sorted(keep)


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
