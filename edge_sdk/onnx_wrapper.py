"""The graphs an ONNX export holds: a VLM's own forward, as a prefill and as one decode step.

Both go through the family's own ``forward`` (image features from its own
``get_image_features``, merged into the text embeddings the way the family merges them,
token types and masks as it reads them); nothing about a family is re-implemented here.
What the wrappers add is the interface ONNX needs: inputs as a flat tuple of tensors, and
the key/value cache as plain tensors in and out (one ``past_key_<i>``/``past_value_<i>``
pair per decoder layer), so that a greedy decode runs the prompt once (prefill) and then
one token at a time.

Positions are an input: :class:`GenerationPositions` computes them exactly as
``generate()`` does, with the model's own ``_prepare_position_ids_for_generation`` (Qwen's
3D M-RoPE positions included), then one more per new token.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from fedvlm.edge.onnx_families import GraphFamily

POSITION_IDS = "position_ids"


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``...ForConditionalGeneration`` inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_layer_count(model: torch.nn.Module) -> int:
    config = base_model(model).config
    return getattr(config, "text_config", config).num_hidden_layers


class _CacheRunner(torch.nn.Module):
    """Runs the model's forward with a cache made of plain tensors; returns logits and the new cache."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        # Registered once: its parameter names, prefixed ``model.``, become the ONNX initializers.
        self.model = base_model(model)
        self.input_names = tuple(input_names)
        self.n_layers = text_layer_count(model)

    def run(self, inputs: dict[str, torch.Tensor], past: Sequence[torch.Tensor]):
        # A plain cache (no sliding-window layers): a sliding-window family still masks by its
        # window, so the logits are the same, and every layer's cache has one shape to export.
        cache = DynamicCache()
        for index in range(len(past) // 2):
            cache.update(past[2 * index], past[2 * index + 1], index)
        outputs = self.model(**inputs, past_key_values=cache, use_cache=True, return_dict=True)
        flat = []
        for layer in outputs.past_key_values.layers[: self.n_layers]:
            flat += [layer.keys, layer.values]
        return (outputs.logits, *flat)


class PrefillGraph(_CacheRunner):
    """``(*input_names) -> (logits, present_key_0, present_value_0, ...)``: the prompt with its
    pictures, in the processor's own tensors (``input_names``: the processor's keys the model
    takes, and ``position_ids``), as ``family`` (:mod:`fedvlm.edge.onnx_families`) feeds them."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], family: GraphFamily | None = None):
        super().__init__(model, input_names)
        self.family = family or GraphFamily()

    def forward(self, *tensors: torch.Tensor):
        return self.run(self.family.forward_inputs(self.model, dict(zip(self.input_names, tensors))), [])


class DecodeGraph(_CacheRunner):
    """``(input_ids [batch, new], attention_mask [batch, past + new], position_ids, past_key_0,
    past_value_0, ...) -> (logits, present_key_0, present_value_0, ...)``."""

    INPUTS = ("input_ids", "attention_mask", POSITION_IDS)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, self.INPUTS)

    def forward(self, input_ids, attention_mask, position_ids, *past: torch.Tensor):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, POSITION_IDS: position_ids}
        return self.run(inputs, past)


class GenerationPositions:
    """Position ids as ``generate()`` makes them, from the model class's own method.

    The model is built on the meta device (no weights, no memory): only its position code
    runs, on the real input tensors.
    """

    def __init__(self, model_class: type, config) -> None:
        with torch.device("meta"):
            self._model = model_class(config)

    @classmethod
    def like(cls, model: torch.nn.Module) -> "GenerationPositions":
        base = base_model(model)
        return cls(type(base), base.config)

    def prefill(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))

    @staticmethod
    def next(position_ids):
        """The positions of one more token per row (``generate()``: the last position + 1)."""
        return position_ids[..., -1:] + 1
