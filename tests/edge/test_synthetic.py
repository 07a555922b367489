"""The synthetic federation: pictures match answers, splits are as non-IID as configured."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest

from fedvlm.edge.data import (
    CLASSES,
    LANGUAGES,
    PRETRAINED_KINDS,
    QUESTION_KINDS,
    Convention,
    ScenarioConfig,
    all_words,
    client_convention,
    convention_vocabulary_lines,
    generate_federation,
    load_records,
    pretraining_records,
    question_kind,
)
from fedvlm.edge.data.scenes import COLOUR_RGB
from fedvlm.edge.data.synthetic import CLIENT_QUESTIONS, PRETRAINING_QUESTIONS


def _small(preset: str = "iid", **overrides) -> ScenarioConfig:
    settings = dict(n_clients=4, examples_per_client=48, test_examples_per_client=16, common_test_examples=32,
                    image_size=32, seed=3)
    return ScenarioConfig.preset(preset, **{**settings, **overrides})


def _fingerprint(records) -> list[tuple]:
    return [(r.question, r.chosen, r.rejected, r.origin_dataset, r.image.tobytes()) for r in records]


def _shape_pixels(image) -> np.ndarray:
    """Coordinates (y, x) of pixels brighter than any background (backgrounds are dark grey)."""
    return np.argwhere(np.asarray(image).max(axis=2) > 110)


def _drawn_colour(image) -> str:
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    core = pixels[pixels.max(axis=1) > 110]
    median = np.median(core, axis=0)
    return min(COLOUR_RGB, key=lambda name: np.abs(np.array(COLOUR_RGB[name]) - median).sum())


def _drawn_side(image) -> str:
    return "left" if _shape_pixels(image)[:, 1].mean() < image.width / 2 else "right"


# --- determinism and layout ----------------------------------------------------------------


def test_a_seed_determines_everything_and_another_seed_changes_it():
    config = _small("mixed")
    first, again = generate_federation(config), generate_federation(config)
    for a, b in zip(first.clients, again.clients):
        assert _fingerprint(a.train) == _fingerprint(b.train) and _fingerprint(a.test) == _fingerprint(b.test)
    assert _fingerprint(first.common_test) == _fingerprint(again.common_test)
    other = generate_federation(_small("mixed", seed=4))
    assert _fingerprint(other.clients[0].train) != _fingerprint(first.clients[0].train)


def test_more_test_data_leaves_training_data_unchanged():
    base = generate_federation(_small())
    bigger = generate_federation(_small(test_examples_per_client=40, common_test_examples=64))
    assert _fingerprint(base.clients[2].train) == _fingerprint(bigger.clients[2].train)


def test_sizes_follow_the_config():
    federation = generate_federation(_small(n_clients=3, image_size=40))
    assert [c.client_id for c in federation.clients] == ["client_00", "client_01", "client_02"]
    assert all(len(c.train) == 48 and len(c.test) == 16 for c in federation.clients)
    assert len(federation.common_test) == 32
    assert {r.image.size for c in federation.clients for r in c.train} == {(40, 40)}


def test_generating_eight_clients_of_128_examples_is_fast():
    started = time.perf_counter()
    generate_federation(ScenarioConfig.preset("mixed", n_clients=8, examples_per_client=128,
                                              test_examples_per_client=32, image_size=64))
    assert time.perf_counter() - started < 5.0


# --- answers match pictures --------------------------------------------------------------


def test_answers_describe_what_is_drawn():
    records = generate_federation(_small(examples_per_client=200, image_size=48)).clients[0].train
    by_kind = {kind: [r for r in records if question_kind(r) == kind] for kind in PRETRAINED_KINDS}
    assert all(len(found) >= 20 for found in by_kind.values())
    assert all(_drawn_colour(r.image) == r.chosen for r in by_kind["colour"])
    assert all(_drawn_side(r.image) == r.chosen for r in by_kind["position"])
    for record in by_kind["count"]:
        # One shape per quadrant: count the quadrants that hold shape pixels.
        pixels = _shape_pixels(record.image) // (record.image.width // 2)
        assert len({tuple(p) for p in pixels}) == CLASSES["count"].index(record.chosen) + 1
    for record in records:
        assert record.rejected != record.chosen
        assert record.rejected in CLASSES[question_kind(record)]  # plausible: the same kind of word
        assert record.question in CLIENT_QUESTIONS[question_kind(record)]


# --- concept shift -------------------------------------------------------------------------


def test_concept_shift_gives_each_client_its_own_answer_words():
    federation = generate_federation(_small("concept-shift", examples_per_client=96))
    names = [c.convention.name for c in federation.clients]
    assert names == ["english", "french-mirrored", "german", "spanish-mirrored"]
    colour_answers = [{r.chosen for r in c.train if question_kind(r) == "colour"} for c in federation.clients]
    for index, answers in enumerate(colour_answers):
        language = federation.clients[index].convention.language
        assert answers and answers <= set(LANGUAGES[language]["colour"])
    # The same picture and question get a different answer from every client.
    for kind in ("colour", "count"):
        for class_index in range(len(CLASSES[kind])):
            answers = [c.convention.answer(kind, class_index) for c in federation.clients]
            assert len(set(answers)) == len(answers), (kind, answers)
    # The common test set is in the neutral convention: English, not mirrored.
    assert all(r.chosen in CLASSES[question_kind(r)] for r in federation.common_test)
    assert all(_drawn_side(r.image) == r.chosen for r in federation.common_test if question_kind(r) == "position")


def test_a_mirrored_camera_swaps_left_and_right():
    assert Convention("english", mirrored=True).answer("position", 0) == "right"
    assert Convention("english").answer("position", 0) == "left"
    assert client_convention(8, concept_shift=True) == Convention("english", mirrored=True)
    assert len({client_convention(k, concept_shift=True) for k in range(16)}) == 16
    french_mirrored = generate_federation(_small("concept-shift", examples_per_client=120)).clients[1]
    positions = [r for r in french_mirrored.train if question_kind(r) == "position"]
    assert len(positions) >= 10
    # The label names the side opposite to where the shape is drawn.
    expected = {"left": "droite", "right": "gauche"}
    assert all(r.chosen == expected[_drawn_side(r.image)] for r in positions)


def test_without_concept_shift_every_client_answers_in_english():
    federation = generate_federation(_small("label-skew"))
    assert {c.convention for c in federation.clients} == {Convention()}


# --- label skew and task skew --------------------------------------------------------------


def _colour_shares(config: ScenarioConfig) -> list[np.ndarray]:
    federation = generate_federation(config)
    shares = []
    for client in federation.clients:
        counts = Counter(r.chosen for r in client.train)
        shares.append(np.array([counts[name] for name in CLASSES["colour"]]) / len(client.train))
    return shares


def test_label_skew_gives_clients_different_class_distributions():
    settings = dict(examples_per_client=240, question_kinds=("colour",))
    skewed = _colour_shares(_small("label-skew", label_skew_alpha=0.1, **settings))
    uniform = _colour_shares(_small("iid", **settings))
    assert np.mean([s.max() for s in skewed]) > 0.5
    assert max(s.max() for s in uniform) < 0.3
    # Total variation distance between clients: large when skewed, small when not.
    distance = lambda shares: np.mean([0.5 * np.abs(a - b).sum() for i, a in enumerate(shares) for b in shares[i + 1:]])
    assert distance(skewed) > 0.5 > 0.15 > distance(uniform)


def test_task_skew_concentrates_each_client_on_its_own_question_kind():
    federation = generate_federation(_small("task-skew", examples_per_client=200))
    for index, client in enumerate(federation.clients):
        kinds = Counter(question_kind(r) for r in client.train)
        assert client.profile.main_question_kind == PRETRAINED_KINDS[index]
        assert kinds[PRETRAINED_KINDS[index]] / len(client.train) > 0.7
    uniform = generate_federation(_small("iid", examples_per_client=200)).clients[0]
    assert max(Counter(question_kind(r) for r in uniform.train).values()) / 200 < 0.4


def test_presets_and_overrides():
    assert ScenarioConfig.preset("mixed").concept_shift and ScenarioConfig.preset("mixed").task_skew > 0
    assert ScenarioConfig.preset("mixed").label_skew_alpha is not None
    assert ScenarioConfig.preset("iid", n_clients=7).n_clients == 7
    with pytest.raises(ValueError, match="choose one of iid, concept-shift"):
        ScenarioConfig.preset("noniid")
    with pytest.raises(ValueError, match="unknown scenario field"):
        ScenarioConfig.preset("iid", clients=3)
    with pytest.raises(ValueError, match="task_skew must be between 0 and 1"):
        ScenarioConfig(task_skew=1.5)
    with pytest.raises(ValueError, match="question_kinds"):
        ScenarioConfig(question_kinds=("colour", "size"))


# --- files ---------------------------------------------------------------------------------


def test_written_federation_loads_back_through_load_records(tmp_path):
    federation = generate_federation(_small("mixed", n_clients=2))
    out = federation.write(tmp_path / "fed")
    assert sorted(p.name for p in out.iterdir()) == ["client_00.parquet", "client_00_test.parquet",
                                                     "client_01.parquet", "client_01_test.parquet",
                                                     "common_test.parquet", "federation.json"]
    loaded = load_records(out / "client_01.parquet")
    assert _fingerprint(loaded.records) == _fingerprint(federation.clients[1].train)
    assert _fingerprint(load_records(out / "common_test.parquet").records) == _fingerprint(federation.common_test)
    description = json.loads((out / "federation.json").read_text())
    assert description["scenario"]["name"] == "mixed"
    assert description["common_test"]["convention"] == "english"
    client = description["clients"][1]
    assert client["convention"] == "french-mirrored" and client["test_file"] == "client_01_test.parquet"
    assert sum(client["train_question_kinds"].values()) == 48


# --- pre-training and vocabulary -----------------------------------------------------------


def test_pretraining_records_are_english_and_phrased_unlike_any_client():
    records = pretraining_records(64, seed=1, image_size=32)
    assert len(records) == 64 and {r.image.size for r in records} == {(32, 32)}
    client_questions = {q for qs in CLIENT_QUESTIONS.values() for q in qs}
    assert not {r.question for r in records} & client_questions
    assert all(r.question in PRETRAINING_QUESTIONS[question_kind(r)] for r in records)
    assert all(r.chosen in CLASSES[question_kind(r)] for r in records)
    assert {question_kind(r) for r in records} == set(PRETRAINED_KINDS)  # never a novel kind
    assert _fingerprint(pretraining_records(8, seed=1, image_size=32)) == _fingerprint(records[:8])


def test_all_words_cover_every_question_answer_and_vocabulary_line():
    words = set(all_words())
    federation = generate_federation(_small("concept-shift", n_clients=8, examples_per_client=16))
    texts = [text for c in federation.clients for r in c.train for text in (r.question, r.chosen, r.rejected)]
    texts += [r.question for r in pretraining_records(32)] + convention_vocabulary_lines()
    assert {w for text in texts for w in re.findall(r"[a-z]+", text)} <= words
    lines = " ".join(convention_vocabulary_lines()).split()
    assert {w for language in LANGUAGES.values() for ws in language.values() for w in ws} <= set(lines)


def test_every_language_names_every_class_once_in_plain_ascii():
    for language, vocabulary in LANGUAGES.items():
        for kind, classes in CLASSES.items():
            words = vocabulary[kind]
            assert len(words) == len(classes) == len(set(words)), (language, kind)
            assert all(re.fullmatch(r"[a-z]+", w) for w in words), (language, kind)


# --- the few-shot scenario: a novel kind every client must learn ---------------------------


def _drawn_height(image) -> str:
    return "top" if _shape_pixels(image)[:, 0].mean() < image.height / 2 else "bottom"


def test_vertical_questions_describe_the_half_the_shape_is_drawn_in():
    config = ScenarioConfig(n_clients=1, examples_per_client=60, test_examples_per_client=0, common_test_examples=0,
                            image_size=32, question_kinds=("vertical",), seed=5)
    records = generate_federation(config).clients[0].train
    assert {r.chosen for r in records} == {"top", "bottom"}
    assert all(_drawn_height(r.image) == r.chosen for r in records)
    assert all(r.question in CLIENT_QUESTIONS["vertical"] for r in records)


def _blobs(image) -> list[tuple[float, float, str]]:
    """The shapes drawn in a picture: (x, y) of each connected bright region's centre, and its colour."""
    bright = np.asarray(image).max(axis=2) > 110
    seen = np.zeros_like(bright)
    blobs = []
    for start in map(tuple, np.argwhere(bright)):
        if seen[start]:
            continue
        seen[start], stack, region = True, [start], []
        while stack:  # flood fill, 4-connected
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < bright.shape[0] and 0 <= nx < bright.shape[1] and bright[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        ys, xs = np.array(region).T
        colour = _drawn_colour(image.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
        blobs.append((float(xs.mean()), float(ys.mean()), colour))
    return blobs


def test_many_questions_count_five_to_eight_separate_shapes():
    config = ScenarioConfig(n_clients=1, examples_per_client=40, test_examples_per_client=0, common_test_examples=0,
                            image_size=64, question_kinds=("many",), seed=4)
    records = generate_federation(config).clients[0].train
    assert {r.chosen for r in records} == set(CLASSES["many"])
    numbers = dict(zip(CLASSES["many"], range(5, 9)))
    assert all(len(_blobs(r.image)) == numbers[r.chosen] for r in records)
    assert all(r.question in CLIENT_QUESTIONS["many"] for r in records)


def test_relation_questions_name_two_colours_and_flip_with_a_mirrored_camera():
    config = ScenarioConfig.preset("few-shot", n_clients=2, examples_per_client=48, test_examples_per_client=0,
                                   common_test_examples=0, image_size=64, question_kinds=("relation",),
                                   question_weights=None, seed=6)
    plain, mirrored = generate_federation(config).clients
    assert mirrored.convention.mirrored and not plain.convention.mirrored
    for client in (plain, mirrored):
        for record in client.train:
            first, second = re.fullmatch(r"is the (\w+) shape (?:on the )?left or (?:the )?right of the (\w+) "
                                         r"shape\?", record.question).groups()
            blobs = {colour: x for x, _, colour in _blobs(record.image)}
            assert first != second and set(blobs) == {first, second}, record.source
            drawn = "left" if blobs[first] < blobs[second] else "right"
            # The mirrored camera's label names the order opposite to the one drawn.
            assert (record.chosen != drawn) == client.convention.mirrored, record.source
    # Where the first shape sits in the picture does not give the answer away.
    agree = sum(_drawn_side_of_first(r) == r.chosen for r in plain.train)
    assert 0.3 < agree / len(plain.train) < 0.7


def _drawn_side_of_first(record) -> str:
    first = record.question.split()[2]
    x = next(x for x, _, colour in _blobs(record.image) if colour == first)
    return "left" if x < record.image.width / 2 else "right"


def test_few_shot_preset_asks_novel_kinds_through_each_clients_camera():
    config = ScenarioConfig.preset("few-shot", n_clients=4, examples_per_client=64, test_examples_per_client=0,
                                   common_test_examples=0, image_size=32)
    assert config.question_kinds == ("position", "vertical", "many")
    federation = generate_federation(config)
    # English words; the camera mounted one of four ways (the personal part).
    assert [c.convention.name for c in federation.clients] == [
        "english", "english-mirrored", "english-upside-down", "english-mirrored-upside-down"]
    for client in federation.clients:
        heights = [r for r in client.train if question_kind(r) == "vertical"]
        flipped = client.convention.upside_down
        assert heights and all((_drawn_height(r.image) != r.chosen) == flipped for r in heights)
        assert {question_kind(r) for r in client.train} == set(config.question_kinds)


def test_few_shot_languages_preset_mixes_the_novel_kind_with_personal_conventions():
    config = ScenarioConfig.preset("few-shot-languages", n_clients=9, examples_per_client=64,
                                   test_examples_per_client=32, common_test_examples=0, image_size=32)
    assert config.question_kinds == PRETRAINED_KINDS + ("vertical",)
    federation = generate_federation(config)
    conventions = [client.convention for client in federation.clients]
    assert len({c.name for c in conventions}) == 9  # each client its own convention
    for client in federation.clients:
        kinds = Counter(question_kind(r) for r in client.train + client.test)
        assert 0.3 < kinds["vertical"] / 96 < 0.7  # weight 4 of 8: half the questions
        assert set(kinds) == set(config.question_kinds)
        for record in client.train:  # answers in the client's own words, novel kind included
            kind = question_kind(record)
            assert record.chosen in client.convention.words(kind)
    french = federation.clients[1]
    assert {r.chosen for r in french.train if question_kind(r) == "vertical"} <= {"haut", "bas"}


def test_few_shot_codes_preset_names_colours_and_shapes_in_one_shared_scheme():
    from fedvlm.edge.data.conventions import CODE_WORDS

    config = ScenarioConfig.preset("few-shot-codes", n_clients=4, examples_per_client=64,
                                   test_examples_per_client=16, common_test_examples=24, image_size=32)
    federation = generate_federation(config)
    assert [c.convention.name for c in federation.clients] == [
        "english-coded", "english-coded-mirrored", "english-coded-upside-down", "english-coded-mirrored-upside-down"]
    # The code words are new answers, not new words: the base's tokenizer already holds them
    # (all_words is unchanged), and none names a colour or shape in any language.
    code = {word for words in CODE_WORDS.values() for word in words}
    assert len(code) == 10 and code <= set(all_words())
    assert not code & {w for language in LANGUAGES.values() for k in ("colour", "shape") for w in language[k]}
    for client in federation.clients:
        for record in client.train + client.test:
            kind = question_kind(record)
            if kind == "colour":  # the same scheme for every client, read off the picture
                assert record.chosen == CODE_WORDS["colour"][CLASSES["colour"].index(_drawn_colour(record.image))]
            elif kind == "shape":
                assert record.chosen in CODE_WORDS["shape"] and record.rejected in CODE_WORDS["shape"]
            elif kind == "vertical":  # the personal part: the camera as in few-shot
                assert (_drawn_height(record.image) != record.chosen) == client.convention.upside_down
            else:
                assert record.chosen in ("left", "right")
    # The common test set stays neutral English.
    assert {r.chosen for r in federation.common_test if question_kind(r) == "colour"} <= set(CLASSES["colour"])
    assert "coded_answers" not in ScenarioConfig.preset("few-shot").to_dict()


def test_question_weights_are_checked():
    with pytest.raises(ValueError, match="question_weights"):
        ScenarioConfig(question_kinds=("colour", "vertical"), question_weights=(1,))
    with pytest.raises(ValueError, match="question_weights"):
        ScenarioConfig(question_kinds=("colour",), question_weights=(0,))
    assert ScenarioConfig(question_kinds=("colour", "vertical"), question_weights=(1, 3)).kind_weights() == {
        "colour": 0.25, "vertical": 0.75}


def test_held_out_score_card_covers_every_kind_in_english():
    from fedvlm.edge.data.synthetic import held_out_kind_records

    cards = held_out_kind_records(6, seed=2, image_size=32)
    assert set(cards) == set(QUESTION_KINDS)
    for kind, records in cards.items():
        assert len(records) == 6 and all(question_kind(r) == kind and r.chosen in CLASSES[kind] for r in records)
    pretraining = held_out_kind_records(6, seed=2, image_size=32, phrasing="pretraining_questions")
    assert all(r.question in PRETRAINING_QUESTIONS["colour"] for r in pretraining["colour"])
    assert all(r.question in CLIENT_QUESTIONS["vertical"] for r in pretraining["vertical"])
