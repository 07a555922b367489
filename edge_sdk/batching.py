"""Turn (image, question, answer) examples into model inputs.

The prompt goes through the model's own processor (so image tokens are expanded exactly
as the model expects); the answer is tokenised separately and appended. That makes the
loss mask exact: labels are the answer tokens (and end-of-sequence), everything before
is ignored. Generation sees the same prompt, so training and inference agree.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from PIL import Image

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    input_ids: torch.Tensor  # [seq]
    labels: torch.Tensor  # [seq], IGNORE_INDEX on prompt tokens
    pixel_values: torch.Tensor  # [channels, height, width]


class PromptFormat:
    """How a question becomes a prompt for this processor's model.

    Models that ship a chat template use it; the tiny test models have none and use a plain
    ``<image>\\nQuestion: ...\\nAnswer:`` prompt with the answer after a space.
    """

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<image>")
        self.uses_chat_template = bool(getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))

    def prompt(self, question: str) -> str:
        if self.uses_chat_template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{self.image_token}\nQuestion: {question.strip()}\nAnswer:"

    def answer_ids(self, answer: str) -> list[int]:
        text = answer.strip() if self.uses_chat_template else " " + answer.strip()
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return list(ids) + ([eos] if eos is not None else [])

    def encode(self, image: Image.Image, question: str, answer: str) -> EncodedExample:
        prompt_inputs = self.processor(images=[image], text=[self.prompt(question)], return_tensors="pt")
        prompt_ids = prompt_inputs["input_ids"][0]
        answer_ids = torch.tensor(self.answer_ids(answer), dtype=prompt_ids.dtype)
        return EncodedExample(
            input_ids=torch.cat([prompt_ids, answer_ids]),
            labels=torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
            pixel_values=prompt_inputs["pixel_values"][0],
        )

    def encode_prompts(self, images: Sequence[Image.Image], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """A left-padded batch of prompts for generation."""
        previous_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            return dict(
                self.processor(
                    images=list(images),
                    text=[self.prompt(q) for q in questions],
                    padding=True,
                    return_tensors="pt",
                )
            )
        finally:
            self.tokenizer.padding_side = previous_side


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch with an attention mask and masked labels."""
    longest = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = example.input_ids
        labels[row, :length] = example.labels
        attention_mask[row, :length] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
    }
