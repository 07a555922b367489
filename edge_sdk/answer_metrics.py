"""Scores of answers against references, for short answers and for paragraph-long ones.

* **exact match** after VQA-style normalisation: meaningful only when answers are a few
  words (``answers_are_short``); a paragraph is never reproduced word for word.
* **ROUGE-L** (F-measure of the longest common subsequence of words; Google's
  ``rouge-score``, with Porter stemming as in its papers) and corpus **BLEU** (``sacrebleu``,
  0-100, its default 13a tokenisation) of greedy answers against ``chosen``.
* From answer log-probabilities (:mod:`fedvlm.edge.answer_likelihood`):
  held-out **loss** (mean negative log-likelihood per answer token of ``chosen``) and
  **perplexity** (``exp(loss)``); **preference accuracy**, the share of pairs whose
  length-normalised log-likelihood (per answer token) of ``chosen`` is above that of
  ``rejected``; and the mean **reward margin**, DPO's implicit reward of chosen minus that of
  rejected, ``beta * ((pc - rc) - (pr - rr))`` with summed log-probabilities of the policy
  (p) and of a reference model (r): how far the model moved towards chosen and away from
  rejected since the reference (undefined, and not reported, without one).
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Sequence

import numpy as np

from fedvlm.shared.usage_error import UsageError

# Answers of at most this many words (every reference) are short: exact match is reported.
SHORT_ANSWER_WORDS = 8

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse spaces (VQA-style)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answers_are_short(references: Sequence[str]) -> bool:
    return all(len(reference.split()) <= SHORT_ANSWER_WORDS for reference in references)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _same_length(predictions, references)
    return float(np.mean([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-1) of each prediction against its reference."""
    _same_length(predictions, references)
    scorer = _rouge_scorer()
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of the predictions against one reference each."""
    _same_length(predictions, references)
    sacrebleu = _import("sacrebleu")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


@dataclasses.dataclass(frozen=True)
class LikelihoodScores:
    """Answer likelihoods of one model on a test set (float64 arrays, one entry per example)."""

    chosen_log_prob: np.ndarray  # summed over the answer tokens
    chosen_tokens: np.ndarray
    rejected_log_prob: np.ndarray | None = None  # None: the test set has no rejected answers
    rejected_tokens: np.ndarray | None = None


def held_out_loss(scores: LikelihoodScores) -> float:
    """Mean negative log-likelihood per answer token of ``chosen``, over all tokens of the set."""
    return float(-scores.chosen_log_prob.sum() / max(int(scores.chosen_tokens.sum()), 1))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def preference_accuracy(scores: LikelihoodScores) -> float:
    """Share of pairs whose chosen answer has the higher mean log-likelihood per token."""
    chosen, rejected = _per_token(scores)
    return float(np.mean(chosen > rejected))


def reward_margin(scores: LikelihoodScores, reference: LikelihoodScores, beta: float) -> float:
    """Mean of ``beta * ((pc - rc) - (pr - rr))``."""
    if scores.rejected_log_prob is None or reference.rejected_log_prob is None:
        raise ValueError("reward margin needs rejected answers")
    margin = (scores.chosen_log_prob - reference.chosen_log_prob) - (scores.rejected_log_prob
                                                                      - reference.rejected_log_prob)
    return float(beta * np.mean(margin))


def _per_token(scores: LikelihoodScores) -> tuple[np.ndarray, np.ndarray]:
    if scores.rejected_log_prob is None or scores.rejected_tokens is None:
        raise ValueError("preference accuracy needs rejected answers")
    return (scores.chosen_log_prob / np.maximum(scores.chosen_tokens, 1),
            scores.rejected_log_prob / np.maximum(scores.rejected_tokens, 1))


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no answers to score")


def _rouge_scorer():
    rouge_scorer = _import("rouge_score.rouge_scorer", "rouge-score")
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _import(module: str, package: str | None = None):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"scoring long answers needs the {package or module} package: "
                         "pip install 'fedvlm[eval]'") from None
