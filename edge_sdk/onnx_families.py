"""What a family needs, besides its own forward, to become an ONNX prefill graph.

Most families need nothing: the processor's tensors go into the forward as they are. A
family whose image code reads sizes out of its inputs as Python numbers (which
``torch.export`` cannot trace) gets a :class:`GraphFamily` here that moves that
bookkeeping out of the graph, computed at run time by the model's own helper functions.

LLaVA-NeXT and LLaVA-OneVision (:class:`AnyResolutionAtOneSize`): their tiling follows each
picture's exact size, so the export answers at one picture size (pictures are resized to it).

Qwen2-VL and Qwen2.5-VL (:class:`QwenPackedVision`): the vision tower packs a picture's
patches into one sequence and splits its attention by lengths read from ``image_grid_thw``
(``cu_seqlens``, ``torch.split`` with data-dependent sizes; Qwen2.5-VL also reorders the
patches into windows). transformers computes all of that in ``transformers.vision_utils``,
and its vision towers take it precomputed (``cu_seqlens``, ``position_ids``,
``window_index``, ``cu_window_seqlens``). So the graph takes those as inputs, computed by
the same helpers from each picture's ``image_grid_thw``, and the tower itself (its own
patch embedding, rotary embedding, blocks and merger) runs in the graph unchanged. Only its
attention kernel is swapped while exporting, for one that reads the packed boundaries as a
block-diagonal mask instead of splitting by them: any picture size then runs through one
graph. The language model's 3-D M-RoPE positions are an input already (the model's own
``get_rope_index``, through :class:`~fedvlm.edge.onnx_wrapper.GenerationPositions`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Transformers hands a vision tower the packed boundaries (``cu_seq_lens_q``) only under
# an attention implementation whose name says "flash"; every other one splits by them.
PACKED_ATTENTION = "fedvlm_flash_packed_mask"


class GraphFamily:
    """The default: the processor's tensors are the graph's inputs and the forward's.

    ``batches_prompts``: whether the prefill graph takes a left-padded batch of prompts. Most
    families' image code keeps a Python list per picture, which a trace fixes at one picture,
    so their prompts are prefilled one at a time (and decoded together).
    """

    batches_prompts = False

    # The one picture size the export answers at (height, width); None: any size.
    fixed_picture_size: tuple[int, int] | None = None

    def picture(self, image):
        """A picture as the graph takes it, before the processor (the default: as it is)."""
        return image

    def graph_feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor's tensors (and positions) -> what the prefill graph takes."""
        return inputs

    def forward_inputs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
        """Inside the graph: its inputs -> the keyword arguments of the model's forward."""
        return inputs

    @contextlib.contextmanager
    def exporting(self, model: torch.nn.Module) -> Iterator[None]:
        """What must hold on ``model`` while its prefill is traced."""
        yield


def packed_mask_attention(module, query, key, value, attention_mask=None, *, cu_seq_lens_q, **kwargs):
    """SDPA over a packed sequence, each token attending only within its own segment of
    ``cu_seq_lens_q`` (what splitting by those boundaries computes, as one masked call)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for unused in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(unused, None)
    positions = torch.arange(query.shape[2], device=query.device)
    # Segment of each token: how many boundaries lie at or before it (ONNX has no searchsorted).
    segment = (positions[:, None] >= cu_seq_lens_q[None, 1:].to(torch.int64)).sum(-1)
    mask = segment[:, None] == segment[None, :]
    return sdpa_attention_forward(module, query, key, value, mask[None, None], **kwargs)


def _register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_mask_attention)


class QwenPackedVision(GraphFamily):
    """Qwen2-VL / Qwen2.5-VL: the vision tower's packing computed outside the graph (module doc).

    A batch's pictures are one packed sequence already (one segment each), so the prefill
    takes the whole left-padded batch at once."""

    batches_prompts = True

    GRID = "image_grid_thw"
    # The names the families' ``get_image_features`` accept precomputed tensors under.
    POSITIONS, BOUNDARIES = "image_position_ids", "image_cu_seqlens"
    WINDOW_ORDER, WINDOW_BOUNDARIES = "image_window_index", "image_cu_window_seqlens"

    def __init__(self, vision_config) -> None:
        self.vision_config = vision_config
        # Qwen2.5-VL attends within windows in every block but the full-attention ones.
        self.windowed = getattr(vision_config, "fullatt_block_indexes", None) is not None

    @property
    def packing_names(self) -> tuple[str, ...]:
        windows = (self.WINDOW_ORDER, self.WINDOW_BOUNDARIES) if self.windowed else ()
        return (self.POSITIONS, self.BOUNDARIES, *windows)

    def graph_feeds(self, inputs):
        from transformers import vision_utils

        config = self.vision_config
        feeds = {k: v for k, v in inputs.items() if k not in (self.GRID, "mm_token_type_ids")}  # positions hold them
        grid = inputs[self.GRID]
        feeds[self.POSITIONS] = vision_utils.get_vision_position_ids(grid, config.spatial_merge_size)
        feeds[self.BOUNDARIES] = vision_utils.get_vision_cu_seqlens(grid)
        if self.windowed:
            order, boundaries = vision_utils.get_vision_window_index(
                grid, config.spatial_merge_size, config.window_size, config.patch_size
            )
            feeds[self.WINDOW_ORDER], feeds[self.WINDOW_BOUNDARIES] = order, boundaries
        return feeds

    def forward_inputs(self, model, inputs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = dict(inputs)
        packing = {name.removeprefix("image_"): inputs.pop(name) for name in self.packing_names}
        tower = model.model.visual
        pixel_values = inputs.pop("pixel_values").type(tower.dtype)
        # The tower's own forward; the maximum segment lengths only size flash kernels, which
        # the packed-mask attention does not use (computing them would read tensor values).
        features = tower(pixel_values, grid_thw=None, max_seqlen=0, max_window_seqlen=0, **packing).pooler_output
        # The forward concatenates the per-picture pieces ``get_image_features`` splits the
        # output into (by the grid) before merging them: one piece is the same, with no split.
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=(features,))}
        return inputs

    @contextlib.contextmanager
    def exporting(self, model):
        _register_packed_attention()
        config = model.model.visual.config
        previous = config._attn_implementation
        config._attn_implementation = PACKED_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = previous


class AnyResolutionAtOneSize(GraphFamily):
    """LLaVA-NeXT / LLaVA-OneVision at one picture size, fixed per export.

    Their ``get_image_features`` plans the tiling and the unpadding of the tile features from
    each picture's ``image_sizes`` (and OneVision's ``batch_num_images``) in Python, so the
    number of tiles and of image tokens follows the picture's exact size and a trace cannot
    take the size as an input. The export therefore answers at one size: every picture is
    resized to the checkpoint's 2x2-tile pinpoint (its largest pinpoint if it has none)
    before the processor, and the graph runs the family's own image code with that size as a
    constant. A picture of another aspect ratio is stretched, so answers can differ from the
    PyTorch model's on the original picture; ``export.json`` records the size.
    """

    def __init__(self, config) -> None:
        tile = config.vision_config.image_size
        pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
        square = (2 * tile, 2 * tile)
        self.fixed_picture_size = square if square in pinpoints else max(pinpoints, key=lambda p: p[0] * p[1])
        # Read as Python numbers by the family's image code: constants in the graph.
        self._constants = {"image_sizes": [list(self.fixed_picture_size)]}
        if config.model_type == "llava_onevision":
            self._constants["batch_num_images"] = [1]  # one picture per prompt

    def picture(self, image):
        height, width = self.fixed_picture_size
        return image if image.size == (width, height) else image.resize((width, height))

    def graph_feeds(self, inputs):
        return {k: v for k, v in inputs.items() if k not in self._constants}

    def forward_inputs(self, model, inputs):
        return {**inputs, **self._constants}


def graph_family(config) -> GraphFamily:
    """The family hooks for a model's config (the default for most families)."""
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        return QwenPackedVision(config.vision_config)
    if config.model_type in ("llava_next", "llava_onevision"):
        return AnyResolutionAtOneSize(config)
    return GraphFamily()
