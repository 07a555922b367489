"""Tiny random-weight models of the VLM families people deploy, one recipe per family.

Each recipe builds the family's own config classes, its own image processor (at a small
image size, so a picture costs a few tokens), its published chat template and a tokenizer
trained here with the family's special tokens, and returns ``(model class, config,
processor)``. Widths and depths come from :class:`~fedvlm.edge.tiny_model.TinyVLMSize`;
every width is a multiple of 64, so the NF4 and int8 paths run on these models too.
"""

from __future__ import annotations

from typing import Callable

from fedvlm.edge.tiny_model import TinyVLMSize
from fedvlm.edge.zoo import chat_templates
from fedvlm.edge.zoo.tokenizer import train_tokenizer

Recipe = Callable[[TinyVLMSize, tuple[str, ...]], tuple[type, object, object]]

# Tokens of the Llama-3 style families (Idefics3, SmolVLM) that tile positions are spelt with.
_TILE_POSITIONS = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))


def _text(dims: TinyVLMSize, tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **extra,
    )  # fmt: skip


def _vision(dims: TinyVLMSize, **extra) -> dict:
    return dict(hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads, **extra)  # fmt: skip


def llava_next(dims: TinyVLMSize, words: tuple[str, ...]):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers import MistralConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = train_tokenizer(dims.vocab_size, extra_words=words, named_tokens=dict(
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", image_token="<image>"))
    # "anyres": a picture becomes a 32x32 overview plus up to 2x2 tiles of 32x32.
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_templates.LLAVA_NEXT)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=dims.vision_hidden, **_vision(dims)),
        text_config=MistralConfig(**_text(dims, tokenizer)), image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints, image_seq_length=16, vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    return LlavaNextForConditionalGeneration, config, processor


def llava_onevision(dims: TinyVLMSize, words: tuple[str, ...]):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    tokenizer = train_tokenizer(dims.vocab_size, extra_words=words, special_tokens=["<|im_start|>"], named_tokens=dict(
        eos_token="<|im_end|>", pad_token="<|endoftext|>", image_token="<image>", video_token="<video>"))
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=chat_templates.LLAVA_ONEVISION,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=32, patch_size=8, **_vision(dims)),
        text_config=Qwen2Config(**_text(dims, tokenizer)), image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    return LlavaOnevisionForConditionalGeneration, config, processor


def _idefics(dims: TinyVLMSize, words: tuple[str, ...], *, smol: bool):
    from transformers import LlamaConfig

    if smol:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMProcessor as Processor
        from transformers import SmolVLMVisionConfig as VisionConfig
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as ImageProcessor
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        template, bos = chat_templates.SMOLVLM, "<|im_start|>"
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3Processor as Processor
        from transformers import Idefics3VisionConfig as VisionConfig
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as ImageProcessor

        template, bos = chat_templates.IDEFICS3, "<|begin_of_text|>"
    tokenizer = train_tokenizer(
        dims.vocab_size, extra_words=words, special_tokens=_TILE_POSITIONS,
        named_tokens=dict(bos_token=bos, eos_token="<end_of_utterance>", pad_token="<|finetune_right_pad_id|>",
                          image_token="<image>", fake_image_token="<fake_token_around_image>",
                          global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>"),
    )  # fmt: skip
    # Pictures are resized to 64 on their longest edge and split into 32x32 tiles plus a
    # global view; each tile is 4x4 patches, pixel-shuffled (scale 2) into 4 tokens.
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    extra = {"video_processor": SmolVLMVideoProcessor(**sizes)} if smol else {}
    processor = Processor(image_processor=ImageProcessor(**sizes), tokenizer=tokenizer, image_seq_len=4,
                          chat_template=template, **extra)
    config = Config(vision_config=VisionConfig(image_size=32, patch_size=8, **_vision(dims)),
                    text_config=LlamaConfig(**_text(dims, tokenizer)), image_token_id=tokenizer.image_token_id,
                    scale_factor=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    return Model, config, processor


def idefics3(dims: TinyVLMSize, words: tuple[str, ...]):
    return _idefics(dims, words, smol=False)


def smolvlm(dims: TinyVLMSize, words: tuple[str, ...]):
    return _idefics(dims, words, smol=True)


def _qwen(dims: TinyVLMSize, words: tuple[str, ...], *, version: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(embed_dim=dims.vision_hidden, hidden_size=dims.text_hidden, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        # Windowed attention in every block but the last, as in the released models.
        vision = dict(hidden_size=dims.vision_hidden, out_hidden_size=dims.text_hidden,
                      intermediate_size=2 * dims.vision_hidden, window_size=56,
                      fullatt_block_indexes=[dims.vision_layers - 1])  # fmt: skip
    tokenizer = train_tokenizer(
        dims.vocab_size, extra_words=words,
        special_tokens=["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        named_tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    )
    # Pictures are resized to between 2x2 and 4x4 merged patches of 28 pixels: 4 to 16 tokens.
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    processor = Processor(image_processor=Qwen2VLImageProcessorPil(**pixels), tokenizer=tokenizer,
                          video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=chat_templates.QWEN2_VL)
    head_dim = dims.text_hidden // dims.text_heads
    # Multimodal RoPE splits each head's rotary half in (time, height, width) sections.
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    config = Config(
        text_config=_text(dims, tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": section}),
        vision_config=dict(depth=dims.vision_layers, num_heads=dims.vision_heads, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )  # fmt: skip
    return Model, config, processor


def qwen2_vl(dims: TinyVLMSize, words: tuple[str, ...]):
    return _qwen(dims, words, version="2")


def qwen2_5_vl(dims: TinyVLMSize, words: tuple[str, ...]):
    return _qwen(dims, words, version="2.5")


def paligemma(dims: TinyVLMSize, words: tuple[str, ...]):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = train_tokenizer(dims.vocab_size, extra_words=words, named_tokens=dict(
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", image_token="<image>"))
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # what PaliGemma's processor expands <image> to
    # The processor adds PaliGemma's <loc>/<seg> tokens to the tokenizer: size the vocabulary after.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(image_size=32, patch_size=8, projection_dim=dims.text_hidden, **_vision(dims)),
        text_config=GemmaConfig(**_text(dims, tokenizer, head_dim=dims.text_hidden // dims.text_heads)),
        image_token_id=tokenizer.image_token_id, projection_dim=dims.text_hidden, tie_word_embeddings=False,
    )
    return PaliGemmaForConditionalGeneration, config, processor


def gemma3(dims: TinyVLMSize, words: tuple[str, ...]):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers import SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = train_tokenizer(
        dims.vocab_size, extra_words=words, special_tokens=["<start_of_turn>", "<end_of_turn>"],
        named_tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                          boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"),
        chat_template=chat_templates.GEMMA3,
    )  # fmt: skip
    # 4x4 patches average-pooled into 2x2 = 4 soft tokens per picture.
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer, image_seq_length=4, chat_template=chat_templates.GEMMA3)
    text = Gemma3TextConfig(**_text(dims, tokenizer, head_dim=dims.text_hidden // dims.text_heads, sliding_window=64))
    config = Gemma3Config(vision_config=SiglipVisionConfig(image_size=32, patch_size=8, **_vision(dims)),
                          text_config=text, mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id,
                          eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id,
                          tie_word_embeddings=False)  # fmt: skip
    return Gemma3ForConditionalGeneration, config, processor


def internvl(dims: TinyVLMSize, words: tuple[str, ...]):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVisionConfig
    from transformers import Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    tokenizer = train_tokenizer(
        dims.vocab_size, extra_words=words, special_tokens=["<|im_start|>"],
        named_tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", start_image_token="<img>",
                          end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>"),
    )  # fmt: skip
    # Dynamic tiling: up to 4 tiles of 32x32 plus a thumbnail; 4x4 patches pixel-shuffled to 4 tokens each.
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                  video_processor=InternVLVideoProcessor(size={"height": 32, "width": 32}),
                                  chat_template=chat_templates.INTERNVL)  # fmt: skip
    config = InternVLConfig(vision_config=InternVLVisionConfig(image_size=[32, 32], patch_size=[8, 8], **_vision(dims)),
                            text_config=Qwen2Config(**_text(dims, tokenizer)),
                            image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5,
                            image_seq_length=4, tie_word_embeddings=False)  # fmt: skip
    return InternVLForConditionalGeneration, config, processor


def mllama(dims: TinyVLMSize, words: tuple[str, ...]):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor, MllamaTextConfig
    from transformers import MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = train_tokenizer(
        dims.vocab_size, extra_words=words, special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
        named_tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                          image_token="<|image|>"),
    )  # fmt: skip
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4),
                                tokenizer=tokenizer, chat_template=chat_templates.MLLAMA)  # fmt: skip
    # The vision output concatenates the last layer with the intermediate ones listed.
    vision = MllamaVisionConfig(hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
                                num_hidden_layers=dims.vision_layers, num_global_layers=1,
                                attention_heads=dims.vision_heads, image_size=32, patch_size=8, max_num_tiles=4,
                                intermediate_layers_indices=[0], vision_output_dim=2 * dims.vision_hidden)
    # Cross-attention to the picture in the last decoder layer. Mllama's embedding table has
    # one row more than the tokenizer (the image token's id is its last row).
    text = MllamaTextConfig(**{**_text(dims, tokenizer), "vocab_size": len(tokenizer) + 1},
                            cross_attention_layers=[dims.text_layers - 1])
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                          tie_word_embeddings=False)
    return MllamaForConditionalGeneration, config, processor


RECIPES: dict[str, Recipe] = {
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "paligemma": paligemma,
    "gemma3": gemma3,
    "internvl": internvl,
    "mllama": mllama,
}
