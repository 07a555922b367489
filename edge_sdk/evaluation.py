"""Evaluation of a model on held-out examples: greedy answers and answer likelihoods.

Which scores mean something depends on the answers (:mod:`fedvlm.edge.answer_metrics`):

* always: held-out **loss** (per answer token of ``chosen``) and **perplexity**;
* short answers (every reference at most ``SHORT_ANSWER_WORDS`` words): **exact match**
  (``accuracy``); for long ones it is None, since a paragraph is never matched word for word;
* long answers: **ROUGE-L** and **BLEU** of greedy answers long enough for a paragraph;
* examples that all have a ``rejected`` answer: **preference accuracy**, and the mean
  **reward margin** against ``reference`` (the scores of the model training started from)
  when one is given.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedvlm.edge import answer_metrics
from fedvlm.edge.answer_likelihood import score_answers
from fedvlm.edge.answer_metrics import LikelihoodScores, normalize_answer  # noqa: F401  (re-exported)
from fedvlm.edge.batching import to_device
from fedvlm.edge.chat_format import ChatFormat
from fedvlm.edge.objectives import DEFAULT_DPO_BETA, SftObjective
from fedvlm.edge.training import QAExample, encode_examples
from fedvlm.shared.usage_error import UsageError

SHORT_ANSWER_NEW_TOKENS = 8
# A long answer's greedy continuation may run this many tokens past the longest reference.
LONG_ANSWER_SLACK_TOKENS = 8
MAX_AUTO_NEW_TOKENS = 512


@dataclasses.dataclass
class EvalMetrics:
    """Scores of one model on a test set; a score that does not apply to the data is None."""

    accuracy: float | None  # exact match, short answers only
    loss: float
    examples: int
    predictions: list[str]
    perplexity: float = float("nan")
    rouge_l: float | None = None
    bleu: float | None = None
    preference_accuracy: float | None = None
    reward_margin: float | None = None
    max_new_tokens: int = SHORT_ANSWER_NEW_TOKENS
    scores: LikelihoodScores | None = dataclasses.field(default=None, repr=False)  # for later reward margins

    def to_dict(self, with_predictions: bool = False) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scores"}
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
    return _generate(model, processor, chat.prompt_batch(images, questions), max_new_tokens, chat)


def _generate(model: torch.nn.Module, processor, prompts: dict[str, torch.Tensor], max_new_tokens: int,
              chat: ChatFormat) -> list[str]:
    """Greedy answers from a batch of prompts (``ChatFormat.prompt_batch``)."""
    device = next(model.parameters()).device
    inputs = to_device(prompts, device)
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


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """A test set encoded once for :func:`evaluate`: the chosen answers as the likelihood pass
    reads them and the prompt batches generation starts from. Encoding (the processor on every
    picture) costs as much as a small model's scoring, and a simulation scores the same test
    set with many adapter states."""

    examples: Sequence[QAExample]
    batch_size: int
    chosen: list
    prompts: list[dict[str, torch.Tensor]]  # one left-padded batch per ``batch_size`` examples
    rejected: list | None  # when every example has a rejected answer


def prepare_evaluation(model: torch.nn.Module, processor, examples: Sequence[QAExample], *,
                       batch_size: int = 32) -> EvalInputs:
    """Encode ``examples`` for :func:`evaluate` (its ``prepared``), once for any adapter state."""
    if len(examples) == 0:
        raise UsageError("no evaluation examples")
    chat = ChatFormat.for_model(processor, model)
    chosen = encode_examples(processor, examples, model, SftObjective())
    prompts = [chat.prompt_batch([e.image for e in examples[start : start + batch_size]],
                                 [e.question for e in examples[start : start + batch_size]])
               for start in range(0, len(examples), batch_size)]
    rejected = [chat.encode(e.image, e.question, e.rejected) for e in examples] if has_rejected(examples) else None
    return EvalInputs(examples, batch_size, chosen, prompts, rejected)


def has_rejected(examples: Sequence[QAExample]) -> bool:
    """Every example carries a non-empty rejected answer (preference metrics apply)."""
    return all(str(getattr(e, "rejected", None) or "").strip() for e in examples)


def new_tokens_for(examples: Sequence[QAExample], encoded: Sequence, max_new_tokens: int | None) -> int:
    """``max_new_tokens`` as given, else 8 for short answers and, for long ones, the longest
    reference answer in tokens plus some slack (at most 512)."""
    if max_new_tokens is not None:
        return max_new_tokens
    if answer_metrics.answers_are_short([e.chosen for e in examples]):
        return SHORT_ANSWER_NEW_TOKENS
    longest = max(int((e.labels != -100).sum()) for e in encoded)
    return min(longest + LONG_ANSWER_SLACK_TOKENS, MAX_AUTO_NEW_TOKENS)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor,
    examples: Sequence[QAExample],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
    description: str = "evaluate",
    reference: LikelihoodScores | None = None,
    beta: float = DEFAULT_DPO_BETA,
    prepared: EvalInputs | None = None,
) -> EvalMetrics:
    """Greedy answers and answer likelihoods of ``examples`` (see the module doc).

    ``max_new_tokens``: the length of greedy answers; None picks it from the answers
    (:func:`new_tokens_for`). ``reference``: the likelihood scores (``EvalMetrics.scores``) of
    the model the reward margin is measured against; ``beta`` scales the margin.
    ``prepared``: ``examples`` already encoded (:func:`prepare_evaluation`, its batch size wins).
    """
    if prepared is None:
        prepared = prepare_evaluation(model, processor, examples, batch_size=batch_size)
    elif prepared.examples is not examples:
        raise ValueError("prepared evaluation inputs belong to another test set")
    was_training = model.training
    model.eval()
    chat = ChatFormat.for_model(processor, model)
    new_tokens = new_tokens_for(examples, prepared.chosen, max_new_tokens)
    predictions: list[str] = []
    for prompts in tqdm(prepared.prompts, desc=description, disable=not progress, leave=False):
        predictions += _generate(model, processor, prompts, new_tokens, chat)
    scores = likelihood_scores(model, processor, examples, batch_size=prepared.batch_size, chosen=prepared.chosen,
                               chat=chat, rejected=prepared.rejected)
    if was_training:
        model.train()
    references = [e.chosen for e in examples]
    short = answer_metrics.answers_are_short(references)
    loss = answer_metrics.held_out_loss(scores)
    preference = scores.rejected_log_prob is not None
    if reference is not None and reference.rejected_log_prob is None:
        reference = None
    return EvalMetrics(
        accuracy=answer_metrics.exact_match(predictions, references) if short else None,
        loss=loss,
        examples=len(examples),
        predictions=predictions,
        perplexity=answer_metrics.perplexity(loss),
        rouge_l=None if short else answer_metrics.rouge_l(predictions, references),
        bleu=None if short else answer_metrics.bleu(predictions, references),
        preference_accuracy=answer_metrics.preference_accuracy(scores) if preference else None,
        reward_margin=answer_metrics.reward_margin(scores, reference, beta) if preference and reference else None,
        max_new_tokens=new_tokens,
        scores=scores,
    )


@torch.no_grad()
def likelihood_scores(model: torch.nn.Module, processor, examples: Sequence[QAExample], *, batch_size: int = 32,
                      chosen: Sequence | None = None, chat: ChatFormat | None = None,
                      rejected: Sequence | None = None) -> LikelihoodScores:
    """Answer log-probabilities of ``chosen`` and, when every example has one, of ``rejected``
    (no generation: what a reward margin's reference needs). ``chosen`` and ``rejected``:
    the answers already encoded."""
    chat = chat or ChatFormat.for_model(processor, model)
    pad_id = processor.tokenizer.pad_token_id
    chosen = chosen if chosen is not None else [chat.encode(e.image, e.question, e.chosen) for e in examples]
    chosen_sum, chosen_count = score_answers(model, chosen, pad_id, batch_size)
    if not has_rejected(examples):
        return LikelihoodScores(chosen_sum.numpy(), chosen_count.numpy())
    if rejected is None:
        rejected = [chat.encode(e.image, e.question, e.rejected) for e in examples]
    rejected_sum, rejected_count = score_answers(model, rejected, pad_id, batch_size)
    return LikelihoodScores(chosen_sum.numpy(), chosen_count.numpy(), rejected_sum.numpy(), rejected_count.numpy())


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of scores that apply (None when none does)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
