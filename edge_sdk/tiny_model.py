"""Tiny LLaVA-style vision-language models, built locally from config.

Nothing may be downloaded at run time, so tests, demos and benchmarks build their own VLM:
a CLIP (or SigLIP) vision tower, a two-layer projector and a Llama text model, with a
byte-level BPE tokenizer trained here, an image processor and a ``LlavaProcessor``. They
are saved with ``save_pretrained`` so that they are loaded back through exactly the code
that loads a real model (:func:`fedvlm.edge.model_loading.load_vlm`).

Every linear layer's input width is a multiple of 64: bitsandbytes quantises in blocks of
64 and its CPU kernels need whole blocks, so the quantised paths run on these models too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

IMAGE_TOKEN = "<image>"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]

VisionTower = Literal["clip", "siglip"]


@dataclasses.dataclass(frozen=True)
class TinyVLMSize:
    """Dimensions of one tiny VLM preset."""

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

# Words the tokenizer learns merges for. The tokenizer is byte-level, so any text encodes;
# this corpus only makes the usual words short.
DEFAULT_CORPUS_WORDS = """
what which how many is are the a an of in on at to and or colour color shape shapes object
objects image picture question answer there left right top bottom middle centre center up
down big small large tiny circle square triangle star cross diamond red green blue yellow
purple orange black white grey gray pink brown one two three four five six seven eight nine
ten zero yes no rouge vert bleu jaune violet noir blanc gris rot grun blau gelb lila schwarz
weiss rojo verde azul amarillo morado negro blanco gris rosso giallo viola nero bianco
cerchio quadrato triangolo cercle carre triangle kreis quadrat dreieck circulo cuadrado
triangulo links rechts gauche droite izquierda derecha sinistra destra un deux trois eins
zwei drei uno dos tres due tre side describe count does look like this that it
""".split()


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (deterministic for a corpus)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # The whole byte alphabet is always in the vocabulary: no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def _corpus(extra_words: Iterable[str]) -> list[str]:
    words = list(DEFAULT_CORPUS_WORDS) + [w for w in extra_words if w]
    # Sentences in both plain and " word" (leading space) form, as BPE sees them in text.
    return [" ".join(words)] * 4 + [" " + w for w in words] * 2


def build_tiny_vlm(
    size: str = "tiny",
    *,
    seed: int = 0,
    vision_tower: VisionTower = "clip",
    extra_words: Iterable[str] = (),
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised tiny LLaVA and its processor, deterministically for ``seed``."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    dims = SIZES[size]
    tokenizer = train_tokenizer(_corpus(extra_words), dims.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    num_patches = (dims.image_size // dims.patch_size) ** 2

    vision_kwargs = dict(
        hidden_size=dims.vision_hidden,
        intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
    )
    if vision_tower == "clip":
        vision_config = CLIPVisionConfig(projection_dim=dims.vision_hidden, **vision_kwargs)
        # CLIP prepends a CLS token; the "default" strategy drops it before the projector.
        select_strategy, additional_tokens = "default", 1
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": dims.image_size},
            crop_size={"height": dims.image_size, "width": dims.image_size},
        )
    elif vision_tower == "siglip":
        vision_config = SiglipVisionConfig(**vision_kwargs)
        select_strategy, additional_tokens = "full", 0
        image_processor = SiglipImageProcessorPil(
            size={"height": dims.image_size, "width": dims.image_size}
        )
    else:
        raise ValueError(f"unknown vision tower {vision_tower!r}; choose 'clip' or 'siglip'")

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
        image_seq_length=num_patches,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_token=IMAGE_TOKEN,
        patch_size=dims.patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=additional_tokens,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, processor


def make_tiny_model(
    out_dir: str | Path,
    size: str = "tiny",
    *,
    seed: int = 0,
    vision_tower: VisionTower = "clip",
    extra_words: Iterable[str] = (),
) -> Path:
    """Build a tiny VLM and save model, tokenizer and processor to ``out_dir``."""
    out = Path(out_dir)
    model, processor = build_tiny_vlm(
        size, seed=seed, vision_tower=vision_tower, extra_words=extra_words
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
