"""Answer conventions: the words a client uses to name the same visual fact.

Concept shift in the synthetic benchmark comes from here. Every client sees the same kind
of pictures and is asked the same English questions, but answers in its own convention:
its own language for every answer word, and for some clients a mirrored camera. A
mirrored camera shows the scene flipped, while the labels describe the scene itself, so
a shape drawn on the left of the picture is labelled "right". One global model cannot
satisfy two conventions at once; a personalised one can.

Answer words are plain lower-case ASCII (diacritics dropped: French "carre", German
"gruen", Portuguese "tres") so that every tokenizer and answer normaliser treats them
alike. A few words coincide across languages, as real words do (French "triangle", Dutch
and German "links"/"rechts", Spanish and Portuguese "azul").
"""

from __future__ import annotations

import dataclasses

from fedvlm.shared.usage_error import UsageError

# What the pre-trained base is taught to read, and what every scenario asks by default.
PRETRAINED_KINDS: tuple[str, ...] = ("colour", "shape", "count", "position")
# Held out of pre-training: skills the base lacks, which the few-shot scenarios' clients must
# all learn: is the shape in the top or the bottom half (vertical), is one shape left or right
# of another (relation: a relation between two objects, not a place in the picture), how many
# shapes past four (many). Only their words are known to the base.
NOVEL_KINDS: tuple[str, ...] = ("vertical", "relation", "many")
QUESTION_KINDS: tuple[str, ...] = PRETRAINED_KINDS + NOVEL_KINDS

# The classes of each question kind, named in English; a class index points into these and
# into every language's word list below.
CLASSES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "white"),
    "shape": ("circle", "square", "triangle", "cross"),
    "count": ("one", "two", "three", "four"),
    "position": ("left", "right"),
    "vertical": ("top", "bottom"),
    "relation": ("left", "right"),
    "many": ("five", "six", "seven", "eight"),
}

LANGUAGES: dict[str, dict[str, tuple[str, ...]]] = {
    "english": CLASSES,
    "french": {
        "colour": ("rouge", "vert", "bleu", "jaune", "violet", "blanc"),
        "shape": ("cercle", "carre", "triangle", "croix"),
        "count": ("un", "deux", "trois", "quatre"),
        "position": ("gauche", "droite"),
        "vertical": ("haut", "bas"),
        "relation": ("gauche", "droite"),
        "many": ("cinq", "six", "sept", "huit"),
    },
    "german": {
        "colour": ("rot", "gruen", "blau", "gelb", "lila", "weiss"),
        "shape": ("kreis", "quadrat", "dreieck", "kreuz"),
        "count": ("eins", "zwei", "drei", "vier"),
        "position": ("links", "rechts"),
        "vertical": ("oben", "unten"),
        "relation": ("links", "rechts"),
        "many": ("fuenf", "sechs", "sieben", "acht"),
    },
    "spanish": {
        "colour": ("rojo", "verde", "azul", "amarillo", "morado", "blanco"),
        "shape": ("circulo", "cuadrado", "triangulo", "cruz"),
        "count": ("uno", "dos", "tres", "cuatro"),
        "position": ("izquierda", "derecha"),
        "vertical": ("arriba", "abajo"),
        "relation": ("izquierda", "derecha"),
        "many": ("cinco", "seis", "siete", "ocho"),
    },
    "italian": {
        "colour": ("rosso", "verde", "blu", "giallo", "viola", "bianco"),
        "shape": ("cerchio", "quadrato", "triangolo", "croce"),
        "count": ("uno", "due", "tre", "quattro"),
        "position": ("sinistra", "destra"),
        "vertical": ("sopra", "sotto"),
        "relation": ("sinistra", "destra"),
        "many": ("cinque", "sei", "sette", "otto"),
    },
    "dutch": {
        "colour": ("rood", "groen", "blauw", "geel", "paars", "wit"),
        "shape": ("cirkel", "vierkant", "driehoek", "kruis"),
        "count": ("een", "twee", "drie", "vier"),
        "position": ("links", "rechts"),
        "vertical": ("boven", "onder"),
        "relation": ("links", "rechts"),
        "many": ("vijf", "zes", "zeven", "acht"),
    },
    "portuguese": {
        "colour": ("vermelho", "verde", "azul", "amarelo", "roxo", "branco"),
        "shape": ("circulo", "quadrado", "triangulo", "cruz"),
        "count": ("um", "dois", "tres", "quatro"),
        "position": ("esquerda", "direita"),
        "vertical": ("cima", "baixo"),
        "relation": ("esquerda", "direita"),
        "many": ("cinco", "seis", "sete", "oito"),
    },
    "indonesian": {
        "colour": ("merah", "hijau", "biru", "kuning", "ungu", "putih"),
        "shape": ("lingkaran", "persegi", "segitiga", "silang"),
        "count": ("satu", "dua", "tiga", "empat"),
        "position": ("kiri", "kanan"),
        "vertical": ("atas", "bawah"),
        "relation": ("kiri", "kanan"),
        "many": ("lima", "enam", "tujuh", "delapan"),
    },
}

# A naming scheme the base was never taught to answer in, shared by every client of the
# few-shot-codes preset: colours and shapes named with words the base knows only from the
# vocabulary lines, as numbers and sides of other languages (so one token each, and no
# prior tying them to any colour or shape). Ten new answer words: a client with ~16 colour
# and shape questions sees each once or twice; the federation sees each ~25-40 times.
CODE_WORDS: dict[str, tuple[str, ...]] = {
    "colour": ("lima", "enam", "tujuh", "delapan", "zeven", "sechs"),
    "shape": ("kiri", "kanan", "atas", "bawah"),
}

# The order in which clients get languages under concept shift: client 0 English, client 1
# French, and so on, wrapping around after the last one.
LANGUAGE_ORDER: tuple[str, ...] = tuple(LANGUAGES)


@dataclasses.dataclass(frozen=True)
class Convention:
    """How a client words its answers.

    Attributes:
        language: one of :data:`LANGUAGES`; every answer word is in it.
        mirrored: the client's camera mirrors the picture, so position answers name the
            opposite side of the one the shape is drawn on, and relation answers the opposite
            of the shapes' order as drawn.
        upside_down: the client's camera is mounted upside down, so height (vertical)
            answers name the opposite half of the one the shape is drawn in.
        coded: colours and shapes are answered in :data:`CODE_WORDS`, not in ``language``.
    """

    language: str = "english"
    mirrored: bool = False
    upside_down: bool = False
    coded: bool = False

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise UsageError(f"unknown answer language {self.language!r}; choose one of {', '.join(LANGUAGES)}")

    @property
    def name(self) -> str:
        return (self.language + ("-coded" if self.coded else "") + ("-mirrored" if self.mirrored else "")
                + ("-upside-down" if self.upside_down else ""))

    @property
    def description(self) -> str:
        """For people: "french, mirrored camera"."""
        return (self.language + (", coded colours and shapes" if self.coded else "")
                + (", mirrored camera" if self.mirrored else "")
                + (", upside-down camera" if self.upside_down else ""))

    def words(self, kind: str) -> tuple[str, ...]:
        """This convention's answer words for a question kind, in class order."""
        if self.coded and kind in CODE_WORDS:
            return CODE_WORDS[kind]
        return LANGUAGES[self.language][kind]

    def answer(self, kind: str, class_index: int) -> str:
        """The answer this client gives when the picture shows class ``class_index``."""
        if (kind in ("position", "relation") and self.mirrored) or (kind == "vertical" and self.upside_down):
            class_index = len(CLASSES[kind]) - 1 - class_index
        return self.words(kind)[class_index]


NEUTRAL_CONVENTION = Convention()
"""English, not mirrored: the convention of the common test set and of pre-training."""


def client_convention(client_index: int, *, concept_shift: bool) -> Convention:
    """The convention of client ``client_index``.

    Without concept shift every client is neutral. With it, languages go round
    :data:`LANGUAGE_ORDER` and odd clients have mirrored cameras; from the second round of
    languages on, the mirroring flips, so 16 clients all differ (client 0 is English and
    client 8 English-mirrored). Client 0 always shares the common test set's convention.
    """
    if not concept_shift:
        return NEUTRAL_CONVENTION
    language_round, language_index = divmod(client_index, len(LANGUAGE_ORDER))
    mirrored = (client_index % 2 == 1) != (language_round % 2 == 1)
    return Convention(LANGUAGE_ORDER[language_index], mirrored)


def camera_convention(client_index: int) -> Convention:
    """Client ``client_index``'s camera under camera shift: English words, the camera mounted one
    of four ways in turn (plain, mirrored, upside down, both), so that a quarter of the clients
    share each. A small personal part (two bits, on the side and height questions) that a client
    can learn from a few examples of its own, unlike a language's every word."""
    return Convention("english", mirrored=client_index % 2 == 1, upside_down=client_index % 4 >= 2)


def convention_vocabulary_lines() -> list[str]:
    """Text-only lines listing every convention's answer words.

    Pre-training reads them in place of a real language model's knowledge of words: a
    model that has seen "rouge" can learn to say it for red from a few examples; one that
    never has must invent its output embedding from nothing. Two kinds of line: per
    language and question kind ("french colours: rouge vert bleu ..."), and per class across
    languages ("red rouge rot rojo rosso rood vermelho merah").
    """
    kind_plurals = {"colour": "colours", "shape": "shapes", "count": "numbers", "position": "sides",
                    "vertical": "heights", "relation": "sides", "many": "numbers"}
    lines = [f"{language} {kind_plurals[kind]}: {' '.join(words[kind])}"
             for language, words in LANGUAGES.items() for kind in QUESTION_KINDS]
    for kind in QUESTION_KINDS:
        for class_index in range(len(CLASSES[kind])):
            lines.append(" ".join(words[kind][class_index] for words in LANGUAGES.values()))
    return list(dict.fromkeys(lines))  # relation words are the sides' words: each line once
