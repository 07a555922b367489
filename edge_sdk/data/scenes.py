"""Pictures of a few coloured shapes, drawn with PIL, and the facts they show.

A :class:`Scene` is sampled first (which shapes, colours, sizes, places) and drawn second,
so the answer to every question kind is read off the scene, never guessed from pixels.
Scenes with one shape answer colour, shape, side (position) and height (vertical) questions; scenes for counting
hold one to four shapes, one per quadrant, so shapes never overlap and every one is
countable even at 32x32 pixels. Scenes past four (many) hold five to eight smaller shapes,
one per cell of a 4 x 4 grid; relation scenes hold two shapes of different colours, apart
from left to right, and ask whether the first is left or right of the second.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fedvlm.edge.data.conventions import CLASSES

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
# Each shape's colour varies by up to this much per channel, so a colour is a region of
# RGB space to learn, not one exact value.
_COLOUR_JITTER = 20
# Backgrounds are dark greys, so every colour (white included) stands out.
_MAX_BACKGROUND_GREY = 60
# Shapes are drawn at this multiple of the output size and box-filtered down: edges come
# out smooth, as in a photo, instead of aliased.
_SUPERSAMPLE = 2
# Smallest image on which all four shapes of a counting scene stay recognisable.
MIN_IMAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: int  # index into CLASSES["shape"]
    colour: int  # index into CLASSES["colour"]
    rgb: tuple[int, int, int]
    centre: tuple[float, float]  # pixels of the output image, (x, y)
    radius: float  # pixels of the output image


@dataclasses.dataclass(frozen=True)
class Scene:
    size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def class_index(self, kind: str) -> int:
        """The true class for a question kind (index into ``CLASSES[kind]``), as drawn."""
        first = self.shapes[0]
        if kind == "colour":
            return first.colour
        if kind == "shape":
            return first.shape
        if kind == "count":
            return len(self.shapes) - 1
        if kind == "position":
            return 0 if first.centre[0] < self.size / 2 else 1
        if kind == "vertical":
            return 0 if first.centre[1] < self.size / 2 else 1
        if kind == "relation":  # is the first shape left (0) or right (1) of the second?
            return 0 if first.centre[0] < self.shapes[1].centre[0] else 1
        if kind == "many":
            return len(self.shapes) - 5
        raise ValueError(f"unknown question kind {kind!r}; choose one of {', '.join(CLASSES)}")

    def draw(self) -> Image.Image:
        scale = _SUPERSAMPLE
        canvas = Image.new("RGB", (self.size * scale, self.size * scale), self.background)
        pen = ImageDraw.Draw(canvas)
        for shape in self.shapes:
            _draw_shape(pen, CLASSES["shape"][shape.shape], shape.rgb,
                        shape.centre[0] * scale, shape.centre[1] * scale, shape.radius * scale)
        return canvas.resize((self.size, self.size), Image.Resampling.BOX)


def _draw_shape(pen: ImageDraw.ImageDraw, name: str, rgb: tuple[int, int, int], x: float, y: float, r: float) -> None:
    if name == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif name == "square":
        # A little smaller than the circle's box, so both cover similar areas.
        half = r * 0.85
        pen.rectangle((x - half, y - half, x + half, y + half), fill=rgb)
    elif name == "triangle":
        pen.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=rgb)
    elif name == "cross":
        arm = r * 0.33
        pen.rectangle((x - r, y - arm, x + r, y + arm), fill=rgb)
        pen.rectangle((x - arm, y - r, x + arm, y + r), fill=rgb)
    else:
        raise ValueError(f"no drawing for shape {name!r}")


def uniform_class_weights() -> dict[str, np.ndarray]:
    """Every class of every kind equally likely (no label skew)."""
    return {kind: np.full(len(names), 1.0 / len(names)) for kind, names in CLASSES.items()}


def sample_scene(
    rng: np.random.Generator,
    kind: str,
    class_weights: Mapping[str, Sequence[float]],
    size: int,
    radius_range: tuple[float, float],
) -> Scene:
    """A scene for a question of ``kind``.

    ``class_weights[k]`` gives the probability of each class of kind ``k`` (colours and
    shapes of every shape drawn, the number of shapes, the side); ``radius_range`` bounds
    a single shape's radius as a fraction of ``size``.
    """

    def pick(attribute: str) -> int:
        weights = class_weights[attribute]
        return int(rng.choice(len(weights), p=weights))

    def colour(avoid: int | None = None) -> tuple[int, tuple[int, int, int]]:
        if avoid is None:
            index = pick("colour")
        else:  # another colour than ``avoid``, by the remaining weights (uniform if they are all zero)
            weights = np.array(class_weights["colour"], dtype=float)
            weights[avoid] = 0.0
            if not weights.sum() > 0:
                weights = np.ones(len(weights))
                weights[avoid] = 0.0
            index = int(rng.choice(len(weights), p=weights / weights.sum()))
        base = np.array(COLOUR_RGB[CLASSES["colour"][index]])
        jittered = np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
        return index, (int(jittered[0]), int(jittered[1]), int(jittered[2]))

    grey = int(rng.integers(0, _MAX_BACKGROUND_GREY + 1))
    background = (grey, grey, grey)
    quarter = size / 4
    if kind == "count":
        count = pick("count") + 1
        cells = rng.permutation(4)[:count]
        shapes = []
        for cell in cells:
            # A little smaller than a lone shape, inside its quadrant with a pixel to spare.
            radius = min(rng.uniform(*radius_range) * size * 0.8, quarter - 1)
            left, top = (cell % 2) * size / 2, (cell // 2) * size / 2
            x = rng.uniform(left + radius + 1, left + size / 2 - radius - 1)
            y = rng.uniform(top + radius + 1, top + size / 2 - radius - 1)
            colour_index, rgb = colour()
            shapes.append(Shape(pick("shape"), colour_index, rgb, (x, y), radius))
        return Scene(size, background, tuple(shapes))

    if kind == "many":
        return _crowd(rng, pick("many") + 5, size, radius_range, colour, background, lambda: pick("shape"))
    if kind == "relation":
        return _pair(rng, pick("relation"), size, radius_range, colour, background, lambda: pick("shape"))

    radius = rng.uniform(*radius_range) * size
    if kind == "position":
        # The whole shape stays inside its half, so the side is never ambiguous.
        radius = min(radius, quarter - 1)
        left = pick("position") * size / 2
        x = rng.uniform(left + radius + 1, left + size / 2 - radius - 1)
    else:
        x = rng.uniform(radius + 1, size - radius - 1)
    if kind == "vertical":  # likewise inside its half, top or bottom
        radius = min(radius, quarter - 1)
        x = min(max(x, radius + 1), size - radius - 1)
        top = pick("vertical") * size / 2
        y = rng.uniform(top + radius + 1, top + size / 2 - radius - 1)
    else:
        y = rng.uniform(radius + 1, size - radius - 1)
    colour_index, rgb = colour()
    return Scene(size, background, (Shape(pick("shape"), colour_index, rgb, (x, y), radius),))


def _crowd(rng: np.random.Generator, count: int, size: int, radius_range: tuple[float, float], colour, background,
           shape) -> Scene:
    """``count`` shapes, one per cell of a 4 x 4 grid (cells of a quarter of the picture's side),
    each inside its cell with a pixel to spare, so none overlap and each is countable."""
    cell_size = size / 4
    shapes = []
    for cell in rng.permutation(16)[:count]:
        radius = min(rng.uniform(*radius_range) * size * 0.6, cell_size / 2 - 1)
        left, top = (cell % 4) * cell_size, (cell // 4) * cell_size
        x = rng.uniform(left + radius + 1, left + cell_size - radius - 1)
        y = rng.uniform(top + radius + 1, top + cell_size - radius - 1)
        colour_index, rgb = colour()
        shapes.append(Shape(shape(), colour_index, rgb, (x, y), radius))
    return Scene(size, background, tuple(shapes))


def _pair(rng: np.random.Generator, order: int, size: int, radius_range: tuple[float, float], colour, background,
          shape) -> Scene:
    """Two shapes of different colours, the first left (``order`` 0) or right (1) of the second,
    their centres at least 3/16 of the picture apart from left to right (never a close call),
    anywhere from top to bottom. The first shape's half of the picture is drawn independently
    of the answer, so where it sits does not give the answer away: a relation, not a place."""
    quarter = size / 4
    first_half = int(rng.integers(2))
    while True:  # sizes too are redrawn: two large shapes may not fit side by side in one half
        radii = [min(rng.uniform(*radius_range) * size * 0.8, quarter - 1) for _ in range(2)]
        gap = max(size * 3 / 16, radii[0] + radii[1] + 2)
        x0 = rng.uniform(max(first_half * size / 2, radii[0] + 1),
                         min((first_half + 1) * size / 2, size - radii[0] - 1))
        x1 = rng.uniform(radii[1] + 1, size - radii[1] - 1)
        if (x0 < x1) == (order == 0) and abs(x0 - x1) >= gap:
            break
    first_colour = colour()
    second_colour = colour(avoid=first_colour[0])
    shapes = tuple(Shape(shape(), c_index, rgb, (x, rng.uniform(r + 1, size - r - 1)), r)
                   for (c_index, rgb), x, r in zip((first_colour, second_colour), (x0, x1), radii))
    return Scene(size, background, shapes)
