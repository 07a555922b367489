"""Which non-IID federation to generate: the scenario configuration and its named presets.

Three kinds of heterogeneity, each off by default and freely combined:

- label skew (``label_skew_alpha``): each client draws, per question kind, a Dirichlet(alpha)
  distribution over the classes (colours, shapes, counts, sides) and samples its pictures
  from it. Small alpha: each client sees mostly a few classes. ``None``: uniform.
- concept shift (``concept_shift``): each client answers in its own convention (its own
  language, and on odd clients a mirrored camera); see
  :func:`fedvlm.edge.data.conventions.client_convention`.
- task skew (``task_skew`` in [0, 1]): client ``k`` asks mostly question kind
  ``question_kinds[k % len(question_kinds)]``; it gets that kind with probability
  ``task_skew + (1 - task_skew) / n_kinds`` and each other kind with
  ``(1 - task_skew) / n_kinds``. 0 is uniform, 1 only the main kind.

The few-shot preset is where clients need each other: 16 clients with 32 examples each, every
one's camera mounted its own way (the personal part: side, height and relation answers flip),
asked only what the base was never taught or does not read in the clients' wording (the common
part): the side and the height of a shape, and how many shapes there are past four (``many``;
see :data:`~fedvlm.edge.data.conventions.NOVEL_KINDS`). No client has enough data to learn
those skills alone. ``relation`` (is one shape left or right of another) is left out of the
preset: on the previous base (one seed) no strategy learnt it in 4 rounds of 8 steps (every
one at chance, 0.49-0.53). ``few-shot-cameras`` is the earlier mix (shape, count, side,
height), half of which the seeing base already reads.

A client's held-out test set follows the client's own distribution and convention (that
is where personalised models are scored). The common test set is uniform over kinds and
classes, in the neutral convention (English, not mirrored).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedvlm.edge.data.conventions import (CLASSES, PRETRAINED_KINDS, QUESTION_KINDS, Convention, camera_convention,
                                          client_convention)
from fedvlm.edge.data.scenes import MIN_IMAGE_SIZE, uniform_class_weights
from fedvlm.shared.usage_error import UsageError

PRESETS: dict[str, dict[str, Any]] = {
    "iid": {},
    "concept-shift": {"concept_shift": True},
    "label-skew": {"label_skew_alpha": 0.3},
    "task-skew": {"task_skew": 0.8},
    "mixed": {"concept_shift": True, "label_skew_alpha": 0.5, "task_skew": 0.5},
    "few-shot": {"camera_shift": True, "n_clients": 16, "examples_per_client": 32,
                 "question_kinds": ("position", "vertical", "many")},
    # The few-shot preset before relation and many: half its questions (shape, count) ask what
    # the seeing base already reads, so there is less for clients to share.
    "few-shot-cameras": {"camera_shift": True, "n_clients": 16, "examples_per_client": 32,
                         "question_kinds": ("shape", "count", "position", "vertical")},
    # A common skill the pooled data teaches and one client's does not: every client answers
    # colours and shapes in the same new naming scheme (CODE_WORDS, ten words), plus the
    # personal camera mounting on side and height.
    "few-shot-codes": {"camera_shift": True, "coded_answers": True, "n_clients": 16, "examples_per_client": 32,
                       "question_kinds": ("colour", "shape", "position", "vertical")},
    "few-shot-languages": {"concept_shift": True, "n_clients": 16, "examples_per_client": 32,
                           "question_kinds": PRETRAINED_KINDS + ("vertical",), "question_weights": (1, 1, 1, 1, 4)},
}


@dataclasses.dataclass(frozen=True)
class ScenarioConfig:
    """A synthetic federation: how many clients, how much data each, how they differ.

    Attributes:
        name: a label for reports (the preset name, or "custom").
        n_clients: number of clients.
        examples_per_client: training examples per client.
        test_examples_per_client: held-out examples per client, in its own distribution.
        common_test_examples: size of the common test set (neutral convention, uniform).
        image_size: width and height of every picture, in pixels.
        label_skew_alpha: Dirichlet concentration of per-client class distributions;
            ``None`` for uniform classes.
        concept_shift: give each client its own answer convention.
        camera_shift: give each client its own camera mounting (mirrored and/or upside down;
            :func:`~fedvlm.edge.data.conventions.camera_convention`), answers in English.
        coded_answers: every client answers colours and shapes in the shared code words
            (:data:`~fedvlm.edge.data.conventions.CODE_WORDS`); the common test set does not.
        task_skew: how strongly each client favours one question kind, 0 to 1.
        question_kinds: which kinds of question to ask (a subset of colour, shape, count,
            position, vertical; by default the kinds pre-training teaches).
        question_weights: relative frequency of each of ``question_kinds`` (same order);
            ``None`` for equal. Task skew mixes these with each client's main kind.
        seed: everything generated is a function of the configuration, seed included.
    """

    name: str = "custom"
    n_clients: int = 4
    examples_per_client: int = 128
    test_examples_per_client: int = 64
    common_test_examples: int = 128
    image_size: int = 64
    label_skew_alpha: float | None = None
    concept_shift: bool = False
    camera_shift: bool = False
    coded_answers: bool = False
    task_skew: float = 0.0
    question_kinds: tuple[str, ...] = PRETRAINED_KINDS
    question_weights: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Lists come in from JSON and command lines; a tuple keeps the config hashable.
        object.__setattr__(self, "question_kinds", tuple(self.question_kinds))
        if self.question_weights is not None:
            object.__setattr__(self, "question_weights", tuple(float(w) for w in self.question_weights))
        problems = []
        if self.n_clients < 1:
            problems.append(f"n_clients must be at least 1, got {self.n_clients}")
        for field in ("examples_per_client", "test_examples_per_client", "common_test_examples"):
            if getattr(self, field) < 0:
                problems.append(f"{field} cannot be negative, got {getattr(self, field)}")
        if self.image_size < MIN_IMAGE_SIZE:
            problems.append(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.label_skew_alpha is not None and not self.label_skew_alpha > 0:
            problems.append(f"label_skew_alpha must be positive (or None for no skew), got {self.label_skew_alpha}")
        if not 0.0 <= self.task_skew <= 1.0:
            problems.append(f"task_skew must be between 0 and 1, got {self.task_skew}")
        unknown = [k for k in self.question_kinds if k not in QUESTION_KINDS]
        if unknown or not self.question_kinds or len(set(self.question_kinds)) != len(self.question_kinds):
            problems.append(f"question_kinds must be distinct kinds out of {', '.join(QUESTION_KINDS)}, "
                            f"got {list(self.question_kinds)}")
        if self.question_weights is not None and (
                len(self.question_weights) != len(self.question_kinds) or min(self.question_weights) < 0
                or not sum(self.question_weights) > 0):
            problems.append(f"question_weights must give one non-negative weight per question kind "
                            f"({len(self.question_kinds)}), not all zero, got {list(self.question_weights)}")
        if self.camera_shift and self.concept_shift:
            problems.append("camera_shift and concept_shift are two kinds of personal convention: choose one")
        if self.seed < 0:
            problems.append(f"seed must be a non-negative integer, got {self.seed}")
        if problems:
            raise UsageError("invalid scenario: " + "; ".join(problems))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ScenarioConfig":
        """A named preset (``iid``, ``concept-shift``, ``label-skew``, ``task-skew``,
        ``mixed``), with any field overridden by keyword."""
        if name not in PRESETS:
            raise UsageError(f"unknown scenario preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UsageError(f"unknown scenario field(s) {', '.join(unknown)}; fields are {', '.join(sorted(fields))}")
        return cls(**{"name": name, **PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["question_kinds"] = list(self.question_kinds)
        if not self.camera_shift:  # descriptions written before the field stay the same
            data.pop("camera_shift")
        if not self.coded_answers:  # likewise
            data.pop("coded_answers")
        if self.question_weights is None:  # likewise
            data.pop("question_weights")
        else:
            data["question_weights"] = list(self.question_weights)
        return data

    def kind_weights(self) -> dict[str, float]:
        """Probability of each question kind before task skew."""
        weights = self.question_weights or (1.0,) * len(self.question_kinds)
        return {kind: weight / sum(weights) for kind, weight in zip(self.question_kinds, weights)}


@dataclasses.dataclass(frozen=True)
class ClientProfile:
    """What makes one client's data its own.

    Attributes:
        convention: how the client words its answers.
        question_weights: probability of each question kind.
        class_weights: per kind, the probability of each class (label skew).
        main_question_kind: the kind the client favours under task skew, else ``None``.
    """

    convention: Convention
    question_weights: dict[str, float]
    class_weights: dict[str, np.ndarray]
    main_question_kind: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": self.convention.name,
            "language": self.convention.language,
            "mirrored": self.convention.mirrored,
            **({"upside_down": True} if self.convention.upside_down else {}),
            "main_question_kind": self.main_question_kind,
            "question_weights": {k: round(w, 4) for k, w in self.question_weights.items()},
            "class_weights": {kind: dict(zip(CLASSES[kind], (round(float(w), 4) for w in weights)))
                              for kind, weights in self.class_weights.items()},
            "answer_words": {kind: list(self.convention.words(kind)) for kind in CLASSES},
        }


def neutral_profile(config: ScenarioConfig) -> ClientProfile:
    """The common test set's profile: English, uniform kinds and classes."""
    return ClientProfile(Convention(), config.kind_weights(), uniform_class_weights(), None)


def client_profile(config: ScenarioConfig, client_index: int, rng: np.random.Generator) -> ClientProfile:
    """Client ``client_index``'s convention, question mix and class distributions."""
    kinds = config.question_kinds
    main_kind = kinds[client_index % len(kinds)] if config.task_skew > 0 else None
    question_weights = {k: (1.0 - config.task_skew) * weight + (config.task_skew if k == main_kind else 0.0)
                        for k, weight in config.kind_weights().items()}
    if config.label_skew_alpha is None:
        class_weights = uniform_class_weights()
    else:
        class_weights = {kind: _dirichlet(rng, config.label_skew_alpha, len(names)) for kind, names in CLASSES.items()}
    convention = (camera_convention(client_index) if config.camera_shift
                  else client_convention(client_index, concept_shift=config.concept_shift))
    if config.coded_answers:
        convention = dataclasses.replace(convention, coded=True)
    return ClientProfile(convention, question_weights, class_weights, main_kind)


def _dirichlet(rng: np.random.Generator, alpha: float, n: int) -> np.ndarray:
    weights = rng.dirichlet(np.full(n, alpha))
    # Very small alphas can round every weight but one to zero; renormalising keeps
    # rng.choice happy about the sum.
    return weights / weights.sum()
