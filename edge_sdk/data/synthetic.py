"""A synthetic visual question answering federation, drawn with PIL: no downloads, seeded.

Pictures hold one to four coloured shapes; questions ask for the colour, the shape, the
number of shapes, or the side of the picture the shape is on, and every answer is one
word. :func:`generate_federation` splits such data over clients in the non-IID ways a
:class:`~fedvlm.edge.data.scenario.ScenarioConfig` describes; :meth:`Federation.write`
saves it as RLAIF-V parquet::

    out_dir/
      client_00.parquet        client 0's training records
      client_00_test.parquet   client 0's held-out records (its own distribution and convention)
      ...
      common_test.parquet      uniform over kinds and classes, neutral convention (English)
      federation.json          the scenario and each client's convention and distributions

For pre-training a base model to see, :func:`pretraining_records` draws generic English
examples with phrasings and shape sizes no client uses, :func:`convention_vocabulary_lines`
lists every convention's words as text, and :func:`all_words` gives a tokenizer every word
any question or answer can contain.

Each record's ``origin_dataset`` is ``"fedvlm-synthetic/<question kind>"``
(:func:`question_kind` reads it back), so results can be broken down by kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedvlm.edge.data.conventions import (
    CLASSES,
    LANGUAGES,
    NEUTRAL_CONVENTION,
    PRETRAINED_KINDS,
    QUESTION_KINDS,
    Convention,
    convention_vocabulary_lines,
)
from fedvlm.edge.data.records import Record
from fedvlm.edge.data.scenario import ClientProfile, ScenarioConfig, client_profile, neutral_profile
from fedvlm.edge.data.scenes import sample_scene, uniform_class_weights
from fedvlm.edge.data.writing import write_records

__all__ = [
    "ClientData",
    "Federation",
    "ScenarioConfig",
    "all_words",
    "convention_vocabulary_lines",
    "generate_federation",
    "pretraining_records",
    "question_kind",
]

ORIGIN_PREFIX = "fedvlm-synthetic/"
DS_NAME = "fedvlm-synthetic"

# What clients are asked. Every client asks in English: only the answers differ.
CLIENT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is the shape?", "which colour is the shape?"),
    "shape": ("what shape is this?", "which shape is shown?"),
    "count": ("how many shapes are there?", "how many shapes are in the picture?"),
    "position": ("is the shape on the left or the right?", "is the shape on the left or right side?"),
    "vertical": ("is the shape at the top or the bottom?", "is the shape in the top or bottom half?"),
    # {first} and {second}: the colours of the scene's two shapes (relation questions name them).
    "relation": ("is the {first} shape left or right of the {second} shape?",
                 "is the {first} shape on the left or the right of the {second} shape?"),
    "many": ("how many shapes are there?", "how many shapes are in the picture?"),
}
# Pre-training asks about the same facts in words no client uses, so the base learns to
# see without learning any client's task verbatim.
PRETRAINING_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("which colour does the figure have?", "name the colour of the figure.",
               "what is the colour of the object?"),
    "shape": ("what kind of figure is drawn?", "name the figure.", "which figure is in the picture?"),
    "count": ("count the figures in the image.", "how many figures can you see?", "how many objects are shown?"),
    "position": ("which side of the image is the figure on?", "on which side is the figure?",
                 "is the figure on the left or on the right?"),
}
# A lone shape's radius as a fraction of the image size. Pre-training spans a wider range
# than clients use, so clients' pictures are familiar but not identical.
CLIENT_RADIUS = (0.10, 0.20)
PRETRAINING_RADIUS = (0.07, 0.24)

# Independent random streams, so that (say) adding test examples leaves training data unchanged.
_PROFILE_STREAM, _TRAIN_STREAM, _TEST_STREAM, _COMMON_STREAM, _PRETRAINING_STREAM, _HELD_OUT_STREAM = range(6)


@dataclasses.dataclass
class ClientData:
    """One client's share of the federation."""

    client_id: str  # "client_00"
    profile: ClientProfile
    train: list[Record]
    test: list[Record]

    @property
    def convention(self) -> Convention:
        return self.profile.convention


@dataclasses.dataclass
class Federation:
    """A generated federation: per-client train/test records and a common test set."""

    config: ScenarioConfig
    clients: list[ClientData]
    common_test: list[Record]

    def describe(self) -> dict[str, Any]:
        """What ``federation.json`` holds: the scenario, file names, each client's profile
        and counts of question kinds and answers."""
        return {
            "format": "RLAIF-V parquet (image as struct {bytes: PNG, path})",
            "generator": __name__,
            "scenario": self.config.to_dict(),
            "common_test": {
                "file": "common_test.parquet",
                "convention": NEUTRAL_CONVENTION.name,
                "examples": len(self.common_test),
            },
            "clients": [
                {
                    "client_id": client.client_id,
                    "train_file": f"{client.client_id}.parquet",
                    "test_file": f"{client.client_id}_test.parquet",
                    "train_examples": len(client.train),
                    "test_examples": len(client.test),
                    **client.profile.to_dict(),
                    "train_question_kinds": _counts(question_kind(r) for r in client.train),
                    "train_answers": _counts(r.chosen for r in client.train),
                }
                for client in self.clients
            ],
        }

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write every split as RLAIF-V parquet plus ``federation.json``; return ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for client in self.clients:
            write_records(client.train, out / f"{client.client_id}.parquet", ds_name=DS_NAME)
            write_records(client.test, out / f"{client.client_id}_test.parquet", ds_name=DS_NAME)
        write_records(self.common_test, out / "common_test.parquet", ds_name=DS_NAME)
        description = out / "federation.json"
        partial = description.with_name(".federation.json.partial")
        partial.write_text(json.dumps(self.describe(), indent=2) + "\n")
        os.replace(partial, description)
        return out


def generate_federation(config: ScenarioConfig) -> Federation:
    """Draw every client's train and test records and the common test set for ``config``."""
    clients = []
    for index in range(config.n_clients):
        client_id = f"client_{index:02d}"
        profile = client_profile(config, index, _rng(config.seed, _PROFILE_STREAM, index))
        train = _records(profile, CLIENT_QUESTIONS, CLIENT_RADIUS, config.image_size, config.examples_per_client,
                         _rng(config.seed, _TRAIN_STREAM, index), f"synthetic:{client_id}/train")
        test = _records(profile, CLIENT_QUESTIONS, CLIENT_RADIUS, config.image_size, config.test_examples_per_client,
                        _rng(config.seed, _TEST_STREAM, index), f"synthetic:{client_id}/test")
        clients.append(ClientData(client_id, profile, train, test))
    common_test = _records(neutral_profile(config), CLIENT_QUESTIONS, CLIENT_RADIUS, config.image_size,
                           config.common_test_examples, _rng(config.seed, _COMMON_STREAM, 0), "synthetic:common_test")
    return Federation(config, clients, common_test)


def pretraining_records(n: int, seed: int = 0, image_size: int = 64,
                        kind_weights: Sequence[float] | None = None) -> list[Record]:
    """``n`` generic English examples (the pre-trained kinds, uniform classes) for pre-training
    a base model to see; phrased and sized unlike any client's data; ``kind_weights``: relative
    frequency of each pre-trained kind (equal by default). The novel kinds
    (:data:`~fedvlm.edge.data.conventions.NOVEL_KINDS`) are never asked."""
    weights = list(kind_weights) if kind_weights is not None else [1.0] * len(PRETRAINED_KINDS)
    profile = ClientProfile(NEUTRAL_CONVENTION, {k: w / sum(weights) for k, w in zip(PRETRAINED_KINDS, weights)},
                            uniform_class_weights(), None)
    return _records(profile, PRETRAINING_QUESTIONS, PRETRAINING_RADIUS, image_size, n,
                    _rng(seed, _PRETRAINING_STREAM, 0), "synthetic:pretraining")


def held_out_kind_records(n: int, seed: int = 0, image_size: int = 64,
                          phrasing: str = "client_questions") -> dict[str, list[Record]]:
    """Per question kind (novel ones included), ``n`` English examples of uniform classes on
    pictures no client or pre-training draws: a base model's per-kind score card.
    ``phrasing``: ``client_questions`` or ``pretraining_questions`` (novel kinds always use
    the clients' phrasing: pre-training has none for them)."""
    questions = {"client_questions": CLIENT_QUESTIONS,
                 "pretraining_questions": {**CLIENT_QUESTIONS, **PRETRAINING_QUESTIONS}}[phrasing]
    radius = CLIENT_RADIUS if phrasing == "client_questions" else PRETRAINING_RADIUS
    return {kind: _records(ClientProfile(NEUTRAL_CONVENTION, {kind: 1.0}, uniform_class_weights(), None), questions,
                           radius, image_size, n, _rng(seed, _HELD_OUT_STREAM, index), f"synthetic:held-out/{kind}")
            for index, kind in enumerate(QUESTION_KINDS)}


def question_kind(record: Record) -> str | None:
    """The question kind of a synthetic record (colour, shape, count, position, vertical), else ``None``."""
    if record.origin_dataset.startswith(ORIGIN_PREFIX):
        kind = record.origin_dataset[len(ORIGIN_PREFIX):]
        return kind if kind in QUESTION_KINDS else None
    return None


def all_words() -> list[str]:
    """Every word a synthetic question, answer or vocabulary line can contain, sorted."""
    texts = [re.sub(r"\{\w+\}", "", q)  # format fields ({first}, {second}) are not words
             for questions in (CLIENT_QUESTIONS, PRETRAINING_QUESTIONS) for qs in questions.values() for q in qs]
    texts += list(CLASSES["colour"])  # what relation questions fill their {first} and {second} with
    texts += [word for language in LANGUAGES.values() for words in language.values() for word in words]
    texts += convention_vocabulary_lines()
    return sorted({word for text in texts for word in re.findall(r"[a-z]+", text.lower())})


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _records(
    profile: ClientProfile,
    questions: Mapping[str, Sequence[str]],
    radius_range: tuple[float, float],
    image_size: int,
    n: int,
    rng: np.random.Generator,
    source_prefix: str,
) -> list[Record]:
    kinds = list(profile.question_weights)
    kind_weights = np.array([profile.question_weights[k] for k in kinds])
    records = []
    for row in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=kind_weights))]
        scene = sample_scene(rng, kind, profile.class_weights, image_size, radius_range)
        truth = scene.class_index(kind)
        # A plausible wrong answer: another class of the same kind, in the same convention.
        wrong = int(rng.choice([c for c in range(len(CLASSES[kind])) if c != truth]))
        records.append(Record(
            scene.draw(),
            question=_question(questions[kind][int(rng.integers(len(questions[kind])))], scene),
            chosen=profile.convention.answer(kind, truth),
            rejected=profile.convention.answer(kind, wrong),
            origin_dataset=ORIGIN_PREFIX + kind,
            source=f"{source_prefix}:row {row}",
        ))
    return records


def _question(template: str, scene) -> str:
    """A question with the colours of the scene's shapes filled in where it names them."""
    if "{" not in template:
        return template
    first, second = (CLASSES["colour"][shape.colour] for shape in scene.shapes[:2])
    return template.format(first=first, second=second)


def _counts(values: Iterable[object]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))
