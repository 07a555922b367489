"""Teach a tiny vision tower to see before any language is involved.

Trained end to end from a random start, a tiny VLM learns colours in a few hundred steps but
stays at chance on shapes, counts and sides for thousands: one one-word answer per picture
is a weak signal that has to pass through a language model that is itself learning. Here
the vision tower is trained first, on its own, with a small classification head per
attribute reading its patch features. Every picture gives a label for every attribute it
shows (a lone shape: its colour, shape, side and the count one; a counting scene: the
count), fresh pictures every step, so the tower sees far more supervision per second. The
heads are thrown away; the language model then learns to read the features
(:mod:`fedvlm.edge.pretraining`).

Colour, shape and count heads read the mean of the patch features, so what they need must be
linearly present in an average over patches: the kind of read the language model's attention
does (a max-pooled head learnt shapes the language model then could not read: 0.34 against the
head's 0.91). The side head reads the patches in place.
Pre-training never asks about the novel kinds
(:data:`~fedvlm.edge.data.conventions.NOVEL_KINDS`): they are what clients must learn.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from fedvlm.edge.data.conventions import CLASSES, PRETRAINED_KINDS

# Attributes whose head reads pooled features; the others read every patch in place.
_POOLED = ("colour", "shape", "count")
_IGNORE = -100
# What the object heads label at each shape's own patch.
_OBJECT_KINDS = ("colour", "shape")


@dataclasses.dataclass
class VisionPretrainingConfig:
    """Attributes:
    steps: optimiser steps (0: skip the stage).
    batch_size: pictures per step, drawn fresh each step.
    learning_rate: peak of a one-cycle schedule (10 % warm-up, cosine down).
    count_share: share of pictures that are counting scenes (the rest hold one shape).
    seed: pictures and head initialisation.
    object_heads: also label, in every picture, the patch under each shape's centre with that
        shape's colour and shape (two linear heads read every patch in place), so each object's
        own patch says what it is: what the language model's attention can find and read,
        where a mean over all patches dilutes one small shape with background.
    fused_optimizer: AdamW's fused kernel (measured 7 ms against 2.5 ms a step for the small
        base's tower and heads, clipping included); the same update up to rounding.
    """

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    count_share: float = 0.4
    seed: int = 0
    object_heads: bool = False
    fused_optimizer: bool = False


def vision_tower_of(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower of a LLaVA-style model (``model.model.vision_tower``)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower: vision pre-training supports LLaVA-style models")
    return tower


class AttributeHeads(torch.nn.Module):
    """One linear classifier per pre-trained attribute over a tower's patch features; with
    ``object_heads``, also colour and shape classifiers applied to every patch in place
    (outputs ``object_colour``, ``object_shape``: batch x patches x classes)."""

    def __init__(self, hidden: int, patches: int, object_heads: bool = False):
        super().__init__()
        self.heads = torch.nn.ModuleDict({
            kind: torch.nn.Linear(hidden if kind in _POOLED else patches * hidden, len(CLASSES[kind]))
            for kind in PRETRAINED_KINDS})  # fmt: skip
        self.object_heads = torch.nn.ModuleDict(
            {f"object_{kind}": torch.nn.Linear(hidden, len(CLASSES[kind])) for kind in _OBJECT_KINDS}
            if object_heads else {})

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = patches.mean(1)
        logits = {kind: head(pooled if kind in _POOLED else patches.flatten(1)) for kind, head in self.heads.items()}
        return {**logits, **{name: head(patches) for name, head in self.object_heads.items()}}


def attribute_batch(rng: np.random.Generator, n: int, image_size: int, radius_range: tuple[float, float],
                    count_share: float, patch_size: int | None = None) -> tuple[list, dict[str, torch.Tensor]]:
    """``n`` fresh pictures and, per pre-trained attribute, each picture's class (-100 where the
    picture does not show it: the colour of a counting scene is ambiguous). With ``patch_size``,
    also ``object_colour`` and ``object_shape``: per patch (row-major), the class of the shape
    whose centre lies in it, else -100."""
    from fedvlm.edge.data.scenes import sample_scene, uniform_class_weights

    weights = uniform_class_weights()
    images, labels = [], {kind: [] for kind in PRETRAINED_KINDS}
    objects = {f"object_{kind}": [] for kind in _OBJECT_KINDS} if patch_size else {}
    for _ in range(n):
        # Sides are drawn inside one half, so a lone shape's side is never ambiguous.
        kind = "count" if rng.random() < count_share else "position"
        scene = sample_scene(rng, kind, weights, image_size, radius_range)
        images.append(scene.draw())
        for attribute in PRETRAINED_KINDS:
            shown = attribute == "count" or len(scene.shapes) == 1
            labels[attribute].append(scene.class_index(attribute) if shown else _IGNORE)
        if patch_size:
            per_row = image_size // patch_size
            for attribute in _OBJECT_KINDS:
                row = [_IGNORE] * per_row**2
                for shape in scene.shapes:
                    x, y = (min(int(c // patch_size), per_row - 1) for c in shape.centre)
                    row[y * per_row + x] = getattr(shape, attribute)
                objects[f"object_{attribute}"].append(row)
    return images, {kind: torch.tensor(values) for kind, values in {**labels, **objects}.items()}


class PixelTable:
    """Turns pictures into the image processor's ``pixel_values`` by a lookup per channel value.

    For pictures already at the model's size, the LLaVA processors' work is per pixel (resize and
    crop are identities; rescale and normalise map each byte of each channel to one float), yet
    they took 11 ms a batch of 32 small pictures against 3 ms for the lookup (a vision step is
    ~55 ms; see :func:`~fedvlm.edge.pretraining.seeing_base_recipe`). The table is read off the processor
    itself, from one picture holding every byte value in every channel, and :meth:`pixel_values`
    falls back to the processor unless the first batch it is given comes out bit-identical: a
    processor that is not per pixel is never approximated.
    """

    def __init__(self, image_processor, image_size: int):
        from PIL import Image

        self.image_processor = image_processor
        # Each channel runs through the 256 byte values with its own stride, so no channel's output
        # could be mistaken for another's.
        index = np.arange(image_size * image_size)
        values = np.stack([(index * stride + offset) % 256 for stride, offset in ((1, 0), (7, 3), (13, 5))], -1)
        probe = Image.fromarray(values.reshape(image_size, image_size, 3).astype(np.uint8))
        out = np.asarray(image_processor([probe], return_tensors="np")["pixel_values"][0])  # C x H x W
        self.table = np.zeros((3, 256), dtype=out.dtype)
        for channel in range(3):
            self.table[channel, values[:, channel]] = out[channel].reshape(-1)
        self.checked: bool | None = None  # None until the first batch was compared with the processor

    def lookup(self, images: list) -> torch.Tensor:
        """The table's ``pixel_values`` (batch x channels x height x width) of RGB pictures."""
        pixels = np.stack([np.asarray(image) for image in images]).astype(np.intp)  # batch x H x W x C
        pixels += np.arange(3) * 256  # each channel's row of the flattened table
        return torch.from_numpy(np.ascontiguousarray(self.table.reshape(-1).take(pixels).transpose(0, 3, 1, 2)))

    def pixel_values(self, images: list) -> torch.Tensor:
        if self.checked is False:
            return self.image_processor(images, return_tensors="pt")["pixel_values"]
        fast = self.lookup(images)
        if self.checked is None:
            reference = self.image_processor(images, return_tensors="pt")["pixel_values"]
            self.checked = (reference.shape == fast.shape and reference.dtype == fast.dtype
                            and torch.equal(reference, fast))
            return fast if self.checked else reference
        return fast


def patch_features(tower: torch.nn.Module, pixel_values: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    """The last layer's patch features, as the LLaVA projector receives them."""
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    return hidden[:, 1:] if drop_cls else hidden


def pretrain_vision(model: torch.nn.Module, processor, config: VisionPretrainingConfig | None = None,
                    *, radius_range: tuple[float, float] = (0.07, 0.24), progress: bool = True) -> dict:
    """Train ``model``'s vision tower in place with attribute heads; returns the heads' accuracy
    per attribute over the last 20 steps' pictures (pictures it had not seen before those steps)."""
    config = config or VisionPretrainingConfig()
    tower = vision_tower_of(model)
    vision_config = model.config.vision_config
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    drop_cls = getattr(model.config, "vision_feature_select_strategy", "default") == "default"
    rng = np.random.default_rng([config.seed, 71])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        heads = AttributeHeads(vision_config.hidden_size, patches, config.object_heads)
    parameters = [*tower.parameters(), *heads.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0,
                                  fused=True if config.fused_optimizer else None)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=max(config.steps, 2), pct_start=0.1)
    correct = {kind: [0, 0] for kind in PRETRAINED_KINDS + tuple(heads.object_heads)}
    pixels = PixelTable(processor.image_processor, vision_config.image_size)
    tower.train()
    for step in tqdm(range(config.steps), desc="pre-train vision", disable=not progress, leave=False):
        images, labels = attribute_batch(rng, config.batch_size, vision_config.image_size, radius_range,
                                         config.count_share,
                                         vision_config.patch_size if config.object_heads else None)
        pixel_values = pixels.pixel_values(images)
        logits = heads(patch_features(tower, pixel_values, drop_cls))
        loss = sum(torch.nn.functional.cross_entropy(logits[k].flatten(0, -2), labels[k].flatten(),
                                                     ignore_index=_IGNORE) for k in logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= config.steps - 20:  # the batch was drawn fresh: scored before this step's update saw it
            for kind, kind_logits in logits.items():
                shown = labels[kind] != _IGNORE
                correct[kind][0] += int((kind_logits.argmax(-1) == labels[kind])[shown].sum())  # per patch too
                correct[kind][1] += int(shown.sum())
    tower.eval()
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    return {kind: round(right / total, 4) for kind, (right, total) in correct.items() if total}
