"""An offline RLAIF-V-like preference data set: long answers about drawn scenes, right and hallucinated.

RLAIF-V (openbmb/RLAIF-V-Dataset) pairs each image and question with a long-form ``chosen``
answer and a ``rejected`` one that hallucinates details, both written by the same model and
judged by a feedback model. Nothing can be downloaded here, so this draws the same shape of
data: scenes of one to four coloured shapes (:mod:`fedvlm.edge.data.scenes`), a ``chosen``
description of several sentences that gets every detail right, and a ``rejected`` one in
the same words but with one or two details hallucinated (a wrong colour, a wrong count, a
shape in the wrong place). Each source (its ``origin_dataset``, answering model, feedback
model and question type) asks its own questions and answers in its own style about its own
aspect of the scene, so a split by source is non-IID in both task and style.

:func:`write_preference_shards` writes parquet shards in the exact published schema
(``ds_name``, ``image`` as ``{bytes, path}`` with PNG bytes, ``question``, ``chosen``,
``rejected``, ``origin_dataset``, ``origin_split`` as JSON text, ``idx``, ``image_path``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from fedvlm.edge.data.conventions import CLASSES
from fedvlm.edge.data.records import DataError
from fedvlm.edge.data.scenes import Scene, sample_scene, uniform_class_weights
from fedvlm.edge.data.writing import rlaifv_schema

DS_NAME = "fedvlm-rlaifv-like"
SHARD_NAME = "train-{index:05d}-of-{count:05d}.parquet"  # as the Hub names a data set's parquet shards
_RADIUS = (0.10, 0.18)
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five")


@dataclasses.dataclass(frozen=True)
class Item:
    """One shape as a description names it."""

    colour: str
    shape: str
    place: str  # "top left", "bottom right", ...
    size: str  # "small" or "large"


def scene_items(scene: Scene) -> list[Item]:
    """The shapes of ``scene``, read off how it was drawn, in reading order (top left first)."""
    half = scene.size / 2
    radii = [shape.radius for shape in scene.shapes]
    middle = (min(radii) + max(radii)) / 2
    items = []
    for shape in scene.shapes:
        x, y = shape.centre
        place = f"{'top' if y < half else 'bottom'} {'left' if x < half else 'right'}"
        size = "large" if len(radii) > 1 and shape.radius > middle else "small"
        items.append(Item(CLASSES["colour"][shape.colour], CLASSES["shape"][shape.shape], place, size))
    order = ("top left", "top right", "bottom left", "bottom right")
    return sorted(items, key=lambda item: order.index(item.place))


# --- hallucinations: the same description, one or two details wrong -------------------------

def hallucinate(items: Sequence[Item], rng: np.random.Generator) -> list[Item]:
    """``items`` with one or two details changed: a wrong colour, an extra or missing shape, a wrong place."""
    changed = list(items)
    for kind in rng.choice(("colour", "count", "place"), size=int(rng.integers(1, 3)), replace=False):
        if kind == "colour":
            k = int(rng.integers(len(changed)))
            wrong = [c for c in CLASSES["colour"] if c != changed[k].colour]
            changed[k] = dataclasses.replace(changed[k], colour=str(rng.choice(wrong)))
        elif kind == "count":
            free = [p for p in ("top left", "top right", "bottom left", "bottom right")
                    if p not in {i.place for i in changed}]
            if len(changed) > 1 and (not free or rng.random() < 0.5):
                changed.pop(int(rng.integers(len(changed))))
            else:  # a shape that is not there
                changed.append(Item(str(rng.choice(CLASSES["colour"])), str(rng.choice(CLASSES["shape"])),
                                    str(rng.choice(free)), "small"))
        else:
            k = int(rng.integers(len(changed)))
            vertical, horizontal = changed[k].place.split()
            flipped = f"{vertical} {'right' if horizontal == 'left' else 'left'}"
            changed[k] = dataclasses.replace(changed[k], place=flipped)
    return changed


# --- sources: who asks what, and how the answers read ---------------------------------------

def _a(item: Item) -> str:
    return f"a {item.colour} {item.shape}"


def _listing(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _plural(n: int, word: str) -> str:
    return f"{_COUNT_WORDS[n] if n < len(_COUNT_WORDS) else n} {word}{'' if n == 1 else 's'}"


def _detailed(items: Sequence[Item], background: str) -> str:
    """Formal and exhaustive, place by place (VisualGenome-style region descriptions)."""
    sentences = [f"The image shows {_plural(len(items), 'geometric shape')} on a {background} background."]
    for item in items:
        sentences.append(f"In the {item.place} corner there is {_a(item)}, drawn {item.size} and with clean edges.")
    sentences.append("Nothing else appears in the picture, and the shapes do not overlap.")
    return " ".join(sentences)


def _counting(items: Sequence[Item], background: str) -> str:
    """Leads with the count, then lists (COCO-captions style)."""
    sentences = [f"There {'is' if len(items) == 1 else 'are'} {_plural(len(items), 'shape')} in this picture: "
                 f"{_listing([_a(i) for i in items])}."]
    sentences.append(f"The first one I notice is the {items[0].colour} {items[0].shape} in the {items[0].place}.")
    largest = [i for i in items if i.size == "large"]
    if largest:
        sentences.append(f"The {largest[0].colour} {largest[0].shape} is the largest of them.")
    sentences.append(f"Counting again to be sure, I see exactly {_COUNT_WORDS[min(len(items), 5)]} "
                     f"and no other objects on the {background} background.")
    return " ".join(sentences)


def _colours(items: Sequence[Item], background: str) -> str:
    """Conversational, about colours (VQA-style answers grown into paragraphs)."""
    colours = sorted({i.colour for i in items})
    sentences = [f"Looking at the picture, I can see {_plural(len(colours), 'colour')} besides the {background} "
                 f"background: {_listing(colours)}."]
    for item in items:
        sentences.append(f"The {item.colour} one is a {item.shape}.")
    sentences.append("The colours are bright and stand out clearly against the dark background.")
    return " ".join(sentences)


def _layout(items: Sequence[Item], background: str) -> str:
    """Spatial, about where things are (reasoning-style answers)."""
    sides = {side: [i for i in items if i.place.endswith(side)] for side in ("left", "right")}
    sentences = ["Sure! Here is how the shapes are arranged."]
    for side, there in sides.items():
        if there:
            sentences.append(f"On the {side} side of the image, "
                             f"{_listing([f'{_a(i)} sits at the {i.place.split()[0]}' for i in there])}.")
        else:
            sentences.append(f"The {side} side of the image is empty.")
    sentences.append(f"The rest of the {background} background is plain.")
    return " ".join(sentences)


@dataclasses.dataclass(frozen=True)
class PreferenceSource:
    """One source of preference pairs: its RLAIF-V labels, its questions and its answering style."""

    origin_dataset: str
    model: str
    feedback_model: str
    type: str
    questions: tuple[str, ...]
    describe: Callable[[Sequence[Item], str], str]

    def origin_split(self) -> str:
        return json.dumps({"model": self.model, "feedback_model": self.feedback_model, "type": self.type})


SOURCES: dict[str, PreferenceSource] = {source.origin_dataset: source for source in (
    PreferenceSource("VisualGenome", "llava-1.5-13b", "RLAIF-V-12B", "detailed_description",
                     ("Describe this image in detail.", "Give a detailed description of everything in the image."),
                     _detailed),
    PreferenceSource("COCO", "OmniLMM-12B", "RLAIF-V-12B", "counting",
                     ("How many objects are in the picture, and what are they?", "Count the shapes and name them."),
                     _counting),
    PreferenceSource("VQAv2", "MiniCPM-V-2", "RLAIF-V-7B", "colour",
                     ("What colours can you see in this image?", "Which colours do the shapes have?"), _colours),
    PreferenceSource("OKVQA", "llava-1.5-7b", "RLAIF-V-7B", "spatial",
                     ("Where are the shapes placed in the image?", "Explain the layout of the picture."), _layout),
)}


def _background_word(scene: Scene) -> str:
    return "black" if scene.background[0] < 25 else "dark grey"


def preference_row(source: PreferenceSource, index: int, image_size: int, rng: np.random.Generator,
                   grain: int = 0) -> dict:
    """One row of the exact RLAIF-V schema, drawn from ``rng``."""
    scene = sample_scene(rng, "count", uniform_class_weights(), image_size, _RADIUS)
    items = scene_items(scene)
    background = _background_word(scene)
    chosen = source.describe(items, background)
    rejected = chosen
    while rejected == chosen:  # a hallucination that changes nothing said is no hallucination
        rejected = source.describe(hallucinate(items, rng), background)
    image = scene.draw()
    if grain:  # sensor noise: PNGs as large as photos, for memory benchmarks
        noise = rng.integers(-grain, grain + 1, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    name = f"{index}.png"
    return {"ds_name": DS_NAME, "image": {"bytes": buffer.getvalue(), "path": name},
            "question": str(rng.choice(source.questions)), "chosen": chosen, "rejected": rejected,
            "origin_dataset": source.origin_dataset, "origin_split": source.origin_split(), "idx": str(index),
            "image_path": name}


def write_preference_shards(out_dir: str | Path, rows: int, *, sources: Sequence[str] | None = None, shards: int = 1,
                            image_size: int = 64, seed: int = 0, row_group_size: int = 64,
                            grain: int = 0) -> list[Path]:
    """Write ``rows`` preference pairs as ``shards`` parquet files in ``out_dir``; returns the files.

    ``sources``: names from :data:`SOURCES` (default: all), dealt in turn so each holds
    about the same share. ``row_group_size`` rows per parquet row group (readers stream by
    row group). ``grain``: amplitude of per-pixel noise (0: clean drawings, a few hundred
    bytes a PNG; 40 gives photo-sized PNGs of tens of kB at 128 pixels).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(sources) if sources else list(SOURCES)
    unknown = [name for name in names if name not in SOURCES]
    if unknown:
        raise DataError(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    if rows < 1 or shards < 1 or shards > rows:
        raise DataError(f"need at least one row and 1 <= shards <= rows, got {rows} rows in {shards} shards")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 53])
    schema = rlaifv_schema()
    per_shard = math.ceil(rows / shards)
    files = []
    for shard in range(shards):
        path = out / SHARD_NAME.format(index=shard, count=shards)
        partial = path.with_name(f".{path.name}.partial")
        with pq.ParquetWriter(partial, schema) as writer:
            group: list[dict] = []
            for index in range(shard * per_shard, min(rows, (shard + 1) * per_shard)):
                group.append(preference_row(SOURCES[names[index % len(names)]], index, image_size, rng, grain))
                if len(group) == row_group_size:
                    writer.write_table(pa.Table.from_pylist(group, schema=schema))
                    group = []
            if group:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
        partial.replace(path)
        files.append(path)
    return files
