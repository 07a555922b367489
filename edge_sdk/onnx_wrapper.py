"""Export-friendly forward passes of a PEFT-wrapped LLaVA: prefill and one decode step.

The stock LLaVA forward does not export: it checks the image-token count against the
image features with data-dependent Python. These wrappers place the image features with
cumsum/gather/where instead, and take and return the key/value cache as plain tensors (one
``past_key_<i>``/``past_value_<i>`` pair per decoder layer), so that a greedy decode runs
the prompt once (prefill) and then one token at a time (decode step).

Positions follow ``generate()`` on a left-padded batch: ``cumsum(attention_mask) - 1``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _llava(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaForConditionalGeneration`` inside a PEFT model (or the model itself)."""
    model = peft_model
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "model") or not hasattr(model.model, "vision_tower"):
        raise TypeError(f"{type(model).__name__} is not a LLaVA-style model (no model.vision_tower)")
    return model


def _positions(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -length:]


class _DecoderRunner(torch.nn.Module):
    """The shared part: the Llama decoder and the LM head on given embeddings."""

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        # Registered once: its parameter names, prefixed ``llava.``, become the ONNX initializers.
        self.llava = _llava(peft_model)
        self.n_layers = self.llava.config.text_config.num_hidden_layers

    def run_decoder(self, inputs_embeds, attention_mask, past: list[tuple[torch.Tensor, torch.Tensor]]):
        cache = DynamicCache()
        for index, (key, value) in enumerate(past):
            cache.update(key, value, index)
        outputs = self.llava.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask, inputs_embeds.shape[1]),
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        logits = self.llava.lm_head(outputs.last_hidden_state)
        present = outputs.past_key_values
        flat = []
        for index in range(self.n_layers):
            layer = present.layers[index]
            flat += [layer.keys, layer.values]
        return (logits, *flat)


class PrefillWrapper(_DecoderRunner):
    """``(input_ids, attention_mask, pixel_values) -> (logits, present_key_0, present_value_0, ...)``.

    Every row holds exactly one image, whose placeholder tokens the processor expanded.
    """

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.llava.config
        outputs = self.llava.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layer = config.vision_feature_layer
        if isinstance(layer, int):
            selected = outputs.hidden_states[layer]
            if config.vision_feature_select_strategy == "default":
                selected = selected[:, 1:]
        else:
            pool = [outputs.hidden_states[i] for i in layer]
            if config.vision_feature_select_strategy == "default":
                pool = [h[:, 1:] for h in pool]
            selected = torch.cat(pool, dim=-1)
        return self.llava.model.multi_modal_projector(selected)  # [batch, n_image_tokens, hidden]

    def forward(self, input_ids, attention_mask, pixel_values):
        embeddings = self.llava.model.get_input_embeddings()
        image_token = self.llava.config.image_token_id
        is_image = input_ids == image_token
        # Image tokens are out of the text vocabulary's useful range: embed a safe id there.
        embeds = embeddings(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        features = self.image_features(pixel_values).to(embeds.dtype)
        # The k-th image token of a row takes the k-th feature vector of that row's image.
        slot = (is_image.long().cumsum(-1) - 1).clamp(min=0, max=features.shape[1] - 1)
        index = slot.unsqueeze(-1).expand(-1, -1, features.shape[-1])
        placed = torch.gather(features, 1, index)
        embeds = torch.where(is_image.unsqueeze(-1), placed, embeds)
        return self.run_decoder(embeds, attention_mask, [])


class DecodeStepWrapper(_DecoderRunner):
    """``(input_ids [batch, new], attention_mask [batch, past + new], past_key_0, past_value_0, ...)
    -> (logits, present_key_0, present_value_0, ...)``."""

    def forward(self, input_ids, attention_mask, *past_flat):
        embeds = self.llava.model.get_input_embeddings()(input_ids)
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.n_layers)]
        return self.run_decoder(embeds, attention_mask, past)
