"""Objectives (SFT, DPO) and the scores of long answers, on cases whose answer is known."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from fedvlm.edge import answer_metrics
from fedvlm.edge.adapters import LoraSettings
from fedvlm.edge.answer_metrics import LikelihoodScores
from fedvlm.edge.objectives import DpoObjective, PreferencePair, SftObjective, build_objective
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.training import TrainingConfig, encode_examples
from fedvlm.shared.usage_error import UsageError

LORA = LoraSettings(r=4, alpha=8, init_seed=7)


@dataclasses.dataclass
class Pair:
    image: Image.Image
    question: str
    chosen: str
    rejected: str | None
    source: str = ""


COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
WRONG = {"red": "green", "green": "blue", "blue": "red"}


def colour_pairs(n_repeat: int = 4) -> list[Pair]:
    return [Pair(Image.new("RGB", (32, 32), rgb), "what colour is it?", name, WRONG[name])
            for name, rgb in COLOURS.items()] * n_repeat


def _model(model_dir, strategy="plora"):
    return PersonalVLM.from_pretrained(model_dir, lora=LORA, strategy=strategy, quantization="none")


# ---- metrics on hand-made numbers --------------------------------------------------------------


def test_preference_accuracy_is_length_normalised():
    # Chosen is longer, so its summed log-probability is lower; per token it is the likelier one.
    scores = LikelihoodScores(chosen_log_prob=np.array([-10.0, -2.0]), chosen_tokens=np.array([20, 2]),
                              rejected_log_prob=np.array([-4.0, -1.0]), rejected_tokens=np.array([4, 2]))
    # pair 0: -0.5 vs -1.0 per token (chosen wins); pair 1: -1.0 vs -0.5 (rejected wins)
    assert answer_metrics.preference_accuracy(scores) == 0.5


def test_reward_margin_against_a_reference():
    policy = LikelihoodScores(np.array([-1.0, -2.0]), np.array([1, 1]), np.array([-5.0, -2.0]), np.array([1, 1]))
    reference = LikelihoodScores(np.array([-2.0, -2.0]), np.array([1, 1]), np.array([-3.0, -3.0]), np.array([1, 1]))
    # beta * mean(((pc - rc) - (pr - rr))) = 0.5 * mean([(1) - (-2), (0) - (1)]) = 0.5 * mean([3, -1]) = 0.5
    assert answer_metrics.reward_margin(policy, reference, beta=0.5) == pytest.approx(0.5)
    assert answer_metrics.reward_margin(policy, policy, beta=1.0) == 0.0


def test_held_out_loss_is_per_token_and_perplexity_its_exponential():
    scores = LikelihoodScores(np.array([-2.0, -4.0]), np.array([1, 3]))
    assert answer_metrics.held_out_loss(scores) == pytest.approx(1.5)
    assert answer_metrics.perplexity(1.5) == pytest.approx(math.exp(1.5))


def test_text_scores_of_identical_and_disjoint_answers():
    paragraph = ["A red car is parked on the left of a small blue house under two tall trees."]
    assert answer_metrics.rouge_l(paragraph, paragraph) == pytest.approx(1.0)
    assert answer_metrics.bleu(paragraph, paragraph) == pytest.approx(100.0)
    other = ["Three dogs run through green grass."]
    assert answer_metrics.rouge_l(other, paragraph) < 0.2
    assert answer_metrics.bleu(other, paragraph) < 5
    assert answer_metrics.exact_match(["The Red!"], ["red"]) == 1.0
    assert answer_metrics.answers_are_short(["red", "two cats"]) and not answer_metrics.answers_are_short(paragraph)


# ---- objectives on a tiny model ------------------------------------------------------------------


def test_dpo_starts_at_log_2_because_the_reference_is_the_model_at_the_start(tiny_model_dir):
    model = _model(tiny_model_dir)
    # Move the adapter away from its initialisation first: the reference must be this state, not the base.
    model.train(colour_pairs(), TrainingConfig(steps=3, learning_rate=1e-2, progress=False))
    metrics = model.train(colour_pairs(), TrainingConfig(steps=6, batch_size=4, learning_rate=1e-2, progress=False,
                                                         objective=DpoObjective(beta=0.5)))
    assert metrics.first_loss == pytest.approx(math.log(2), abs=1e-4)  # policy == reference before step 1
    assert metrics.loss < metrics.first_loss


def test_dpo_teaches_the_model_to_prefer_chosen(tiny_model_dir):
    model = _model(tiny_model_dir)
    pairs = colour_pairs()
    before = model.evaluate(pairs)
    # Learning rate 1e-2: at 2e-2 DPO overshoots on these 3 pairs, and whether one pair ends the
    # wrong way round depended on the run (2/3 or 3/3 at 40 steps). At 1e-2 the margin is 2.0.
    model.train(pairs, TrainingConfig(steps=40, batch_size=6, learning_rate=1e-2, progress=False,
                                      objective=DpoObjective(beta=0.5)))
    after = model.evaluate(pairs, reference=before.scores, beta=0.5)
    assert after.preference_accuracy == 1.0
    assert after.reward_margin > 0.5  # chosen gained against rejected, relative to the start
    assert after.accuracy is not None  # one-word answers: exact match applies; ROUGE-L/BLEU do not
    assert after.rouge_l is None and after.bleu is None


def test_a_model_trained_on_chosen_prefers_chosen(tiny_model_dir):
    # The random tiny model cannot see colours in a few steps, but after SFT it knows the
    # answers are colour words: a rejected answer that is no colour at all is the less likely.
    model = _model(tiny_model_dir, "fedit")
    pairs = [dataclasses.replace(p, rejected="a tree") for p in colour_pairs()]
    before = model.evaluate(pairs)
    model.train(pairs, TrainingConfig(steps=25, batch_size=6, learning_rate=2e-2, progress=False))
    after = model.evaluate(pairs)
    assert before.preference_accuracy < 1.0 and after.preference_accuracy == 1.0
    assert after.loss < before.loss
    assert after.perplexity == pytest.approx(math.exp(after.loss))


def test_long_answers_get_rouge_and_bleu_and_no_exact_match(tiny_model_dir):
    model = _model(tiny_model_dir)
    long = [dataclasses.replace(p, chosen=f"The picture is filled with a single {p.chosen} colour from edge to edge.",
                                rejected=f"The picture shows a {p.rejected} ball on a white table near a window.")
            for p in colour_pairs(1)]
    result = model.evaluate(long)
    assert result.accuracy is None
    assert 0.0 <= result.rouge_l <= 1.0 and 0.0 <= result.bleu <= 100.0
    assert result.max_new_tokens > 8  # a paragraph's worth, from the references' length


def test_dpo_needs_rejected_answers_and_says_which(tiny_model_dir):
    model = _model(tiny_model_dir)
    pairs = colour_pairs(1)
    pairs[1] = dataclasses.replace(pairs[1], rejected="", source="shard.parquet:row 1")
    with pytest.raises(UsageError, match="shard.parquet:row 1 has none"):
        model.train(pairs, TrainingConfig(steps=1, progress=False, objective=DpoObjective()))


def test_objectives_encode_what_they_train_on(tiny_model_dir):
    model = _model(tiny_model_dir)
    pairs = colour_pairs(1)
    sft = encode_examples(model.processor, pairs, model.model, SftObjective())
    dpo = encode_examples(model.processor, pairs, model.model, DpoObjective())
    assert all(isinstance(p, PreferencePair) for p in dpo)
    assert [len(e) for e in sft] == [len(p.chosen) for p in dpo]
    assert build_objective("dpo", 0.2) == DpoObjective(beta=0.2)
    with pytest.raises(UsageError, match="--dpo-beta"):
        DpoObjective(beta=0)
    with pytest.raises(UsageError, match="choose one of sft, dpo"):
        build_objective("ppo")


def test_a_test_set_encoded_once_scores_every_adapter_state_as_a_fresh_evaluation(tiny_model_dir):
    # The simulator encodes each test set once and swaps adapter states in between scorings
    # (fedvlm.edge.adapters copies into PEFT's parameters directly): both must be invisible.
    from fedvlm.edge.evaluation import evaluate, prepare_evaluation

    model = _model(tiny_model_dir)
    pairs = colour_pairs(1)
    prepared = prepare_evaluation(model.model, model.processor, pairs)
    start = model.adapter_state()
    model.train(pairs, TrainingConfig(steps=4, batch_size=4, learning_rate=2e-2, progress=False))
    trained = model.adapter_state()
    losses = []
    for state in (start, trained, start):
        model.load_adapter_state(state)
        assert all(np.array_equal(v, state[k]) for k, v in model.adapter_state().items())
        fresh = model.evaluate(pairs)
        once = evaluate(model.model, model.processor, pairs, prepared=prepared)
        assert once.predictions == fresh.predictions
        assert once.loss == pytest.approx(fresh.loss, abs=1e-6)
        assert once.preference_accuracy == fresh.preference_accuracy
        losses.append(once.loss)
    assert losses[0] == pytest.approx(losses[2], abs=1e-6) and losses[1] < losses[0]  # the state loaded is scored
    with pytest.raises(ValueError, match="another test set"):
        evaluate(model.model, model.processor, pairs[:2], prepared=prepared)
