"""Evaluation: greedy answers, exact-match accuracy after normalisation, and loss."""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fedvlm.edge.batching import IGNORE_INDEX, collate, to_device
from fedvlm.edge.chat_format import ChatFormat
from fedvlm.edge.training import QAExample, encode_examples
from fedvlm.shared.usage_error import UsageError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse spaces (VQA-style)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@dataclasses.dataclass
class EvalMetrics:
    accuracy: float
    loss: float
    examples: int
    predictions: list[str]

    def to_dict(self, with_predictions: bool = False) -> dict:
        data = dataclasses.asdict(self)
        if not with_predictions:
            data.pop("predictions")
        return data


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor,
    images: Sequence,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 8,
    chat: ChatFormat | None = None,
) -> list[str]:
    """Greedy answers to ``questions`` about ``images`` (one batch), stopping at the
    template's end-of-turn token as the model was trained to."""
    chat = chat or ChatFormat.for_model(processor, model)
    device = next(model.parameters()).device
    inputs = to_device(chat.prompt_batch(images, questions), device)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=chat.stop_token_ids,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor,
    examples: Sequence[QAExample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: bool = False,
    description: str = "evaluate",
) -> EvalMetrics:
    """Exact-match accuracy of greedy answers against ``chosen``, and the teacher-forced loss."""
    if len(examples) == 0:
        raise UsageError("no evaluation examples")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chat = ChatFormat.for_model(processor, model)
    encoded = encode_examples(processor, examples, model)
    predictions: list[str] = []
    loss_sum, token_count = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        predictions += generate_answers(
            model, processor, [e.image for e in chunk], [e.question for e in chunk], max_new_tokens=max_new_tokens,
            chat=chat,
        )
        batch = to_device(collate(encoded[start : start + batch_size], processor.tokenizer.pad_token_id), device)
        # Weight each batch's mean loss by its answer tokens, so the total is a per-token mean.
        n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss_sum += float(model(**batch).loss) * n_tokens
        token_count += n_tokens
    if was_training:
        model.train()
    correct = sum(normalize_answer(p) == normalize_answer(e.chosen) for p, e in zip(predictions, examples))
    return EvalMetrics(
        accuracy=correct / len(examples),
        loss=loss_sum / max(token_count, 1),
        examples=len(examples),
        predictions=predictions,
    )
