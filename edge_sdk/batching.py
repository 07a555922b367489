"""Collate what a model's processor returns, for any VLM family, into one batch.

An example is kept exactly as the model's own processor returned it for that one image
and conversation (batch dimension 1): token ids and their masks, and the pixel data in
whatever layout the family uses (one picture, tiles, flattened patches) with the tensors
that describe it (grids, image sizes, aspect ratios). :func:`collate` joins such examples
by two rules, which cover every family transformers ships:

* **per-token keys** (:data:`SEQUENCE_KEYS`: ids, attention and token-type masks, labels,
  Mllama's cross-attention mask) are padded along the sequence, on the right for training
  and on the left for generation, with the pad id, ``IGNORE_INDEX`` for labels and 0 for
  masks;
* **everything else** is concatenated along its first axis, other axes zero-padded to the
  batch's largest. That is what the processors themselves do for a batch: LLaVA-NeXT's and
  Idefics3's tiles, Mllama's tiles and aspect masks are zero-padded (the models skip
  all-zero tiles), Qwen2-VL's and InternVL's patch rows and Gemma 3's pictures are
  concatenated, and one-row tensors (image sizes, grids) stack.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping, Sequence

import torch

IGNORE_INDEX = -100

# Keys whose second axis is the token sequence.
SEQUENCE_KEYS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask", "labels"}
)

PaddingSide = Literal["left", "right"]


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """One conversation as the model takes it: the processor's tensors (batch axis 1) and
    labels that cover the answer and the end-of-turn token only."""

    inputs: Mapping[str, torch.Tensor]
    labels: torch.Tensor  # [seq], IGNORE_INDEX on the prompt

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"][0]

    def __len__(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def _pad_to(tensor: torch.Tensor, shape: Sequence[int], value, *, left_axis: int | None = None) -> torch.Tensor:
    """``tensor`` grown to ``shape`` with ``value``; along ``left_axis`` the padding goes first."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = torch.full(tuple(shape), value, dtype=tensor.dtype)
    index = []
    for axis, size in enumerate(tensor.shape):
        start = shape[axis] - size if axis == left_axis else 0
        index.append(slice(start, start + size))
    out[tuple(index)] = tensor
    return out


def _pad_value(key: str, pad_token_id: int):
    return {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)


def collate_inputs(
    rows: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int, *, padding_side: PaddingSide = "right"
) -> dict[str, torch.Tensor]:
    """Join per-example processor outputs (batch axis 1 each) into one batch; see the module doc."""
    keys = list(rows[0])
    for row in rows[1:]:
        if list(row) != keys:
            raise ValueError(f"examples of one batch carry different inputs: {keys} vs {list(row)}")
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [row[key] for row in rows]
        longest = [max(t.shape[axis] for t in tensors) for axis in range(tensors[0].dim())]
        value = _pad_value(key, pad_token_id)
        if key in SEQUENCE_KEYS:
            left = 1 if padding_side == "left" else None
            batch[key] = torch.cat([_pad_to(t, [t.shape[0], *longest[1:]], value, left_axis=left) for t in tensors])
        else:
            batch[key] = torch.cat([_pad_to(t, [t.shape[0], *longest[1:]], value) for t in tensors])
    return batch


def collate(
    examples: Sequence[EncodedExample], pad_token_id: int, *, padding_side: PaddingSide = "right"
) -> dict[str, torch.Tensor]:
    """A training batch: the examples' inputs and labels, padded together."""
    rows = [{**e.inputs, "labels": e.labels.unsqueeze(0)} for e in examples]
    return collate_inputs(rows, pad_token_id, padding_side=padding_side)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Move a batch; floating tensors (pixel data) take ``dtype`` when given, ids and masks keep theirs."""
    moved = {}
    for key, value in batch.items():
        if dtype is not None and value.is_floating_point():
            moved[key] = value.to(device=device, dtype=dtype)
        else:
            moved[key] = value.to(device)
    return moved
