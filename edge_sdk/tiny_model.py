"""Tiny vision-language models of every supported family, built locally from config.

Nothing may be downloaded at run time, so tests, demos and benchmarks build their own VLM
with the family's own config classes, image processor and chat template, and a tokenizer
trained here (recipes in :mod:`fedvlm.edge.zoo.families`). They are saved with
``save_pretrained`` so that they are loaded back through exactly the code that loads a
real checkpoint (:func:`fedvlm.edge.model_loading.load_vlm`).

The default, ``llava``, is a CLIP (or SigLIP) vision tower, a two-layer projector and a
Llama text model: the model the demo pre-trains. Every linear layer's input width is a
multiple of 64: bitsandbytes quantises in blocks of 64 and its CPU kernels need whole
blocks, so the quantised paths run on every tiny model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Literal

import torch

from fedvlm.edge.zoo import ARCHITECTURES
from fedvlm.shared.usage_error import UsageError

VisionTower = Literal["clip", "siglip"]


@dataclasses.dataclass(frozen=True)
class TinyVLMSize:
    """Dimensions of one tiny VLM preset (the LLaVA recipe also takes its image geometry)."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int


SIZES: dict[str, TinyVLMSize] = {
    # < 1M parameters: unit tests.
    "tiny": TinyVLMSize(
        image_size=32, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=2,
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128,
        vocab_size=1024,
    ),
    # About 3M parameters, 64x64 images: demos and benchmarks.
    # 16x16 patches: 16 image tokens keep a 2-core CPU demo fast (8x8 patches, 64 tokens,
    # took twice as long to pre-train and learnt position worse in the same steps).
    "small": TinyVLMSize(
        image_size=64, patch_size=16, vision_hidden=128, vision_layers=4, vision_heads=4,
        text_hidden=192, text_layers=4, text_heads=6, text_kv_heads=3, text_intermediate=768,
        vocab_size=2048,
    ),
}

def _llava(dims: TinyVLMSize, words: tuple[str, ...], vision_tower: VisionTower):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor, SiglipVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from fedvlm.edge.zoo.chat_templates import LLAVA
    from fedvlm.edge.zoo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(dims.vocab_size, extra_words=words, named_tokens=dict(
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", image_token="<image>"))
    num_patches = (dims.image_size // dims.patch_size) ** 2
    vision_kwargs = dict(
        hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
        image_size=dims.image_size, patch_size=dims.patch_size,
    )  # fmt: skip
    if vision_tower == "clip":
        vision_config = CLIPVisionConfig(projection_dim=dims.vision_hidden, **vision_kwargs)
        # CLIP prepends a CLS token; the "default" strategy drops it before the projector.
        select_strategy, additional_tokens = "default", 1
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": dims.image_size}, crop_size={"height": dims.image_size, "width": dims.image_size})
    elif vision_tower == "siglip":
        vision_config = SiglipVisionConfig(**vision_kwargs)
        select_strategy, additional_tokens = "full", 0
        image_processor = SiglipImageProcessorPil(size={"height": dims.image_size, "width": dims.image_size})
    else:
        raise ValueError(f"unknown vision tower {vision_tower!r}; choose 'clip' or 'siglip'")
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy=select_strategy, projector_hidden_act="gelu",
        image_seq_length=num_patches, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_token="<image>", patch_size=dims.patch_size,
        vision_feature_select_strategy=select_strategy, num_additional_image_tokens=additional_tokens,
        chat_template=LLAVA,
    )  # fmt: skip
    return LlavaForConditionalGeneration, config, processor


def check_architecture(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return arch


def build_tiny_vlm(
    size: str = "tiny",
    *,
    arch: str = "llava",
    seed: int = 0,
    vision_tower: VisionTower = "clip",
    extra_words: Iterable[str] = (),
):
    """Build a randomly initialised tiny VLM of family ``arch`` and its processor,
    deterministically for ``seed``. ``vision_tower`` applies to ``llava`` only."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    check_architecture(arch)
    dims, words = SIZES[size], tuple(extra_words)
    if arch == "llava":
        model_class, config, processor = _llava(dims, words, vision_tower)
    else:
        from fedvlm.edge.zoo.families import RECIPES

        model_class, config, processor = RECIPES[arch](dims, words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    return model, processor


def make_tiny_model(
    out_dir: str | Path,
    size: str = "tiny",
    *,
    arch: str = "llava",
    seed: int = 0,
    vision_tower: VisionTower = "clip",
    extra_words: Iterable[str] = (),
) -> Path:
    """Build a tiny VLM and save model, tokenizer and processor to ``out_dir``."""
    out = Path(out_dir)
    model, processor = build_tiny_vlm(size, arch=arch, seed=seed, vision_tower=vision_tower, extra_words=extra_words)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
