"""A byte-level BPE tokenizer for a tiny model of one family, trained here in milliseconds.

Each family's processor looks its special tokens up on the tokenizer (``image_token``,
``boi_token``, ``start_image_token``, ...); a family's recipe names them, and they become
both vocabulary entries and named attributes, as in the family's published tokenizer.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Words the tokenizer learns merges for. The tokenizer is byte-level, so any text encodes;
# this corpus only makes the usual words short.
CORPUS_WORDS = """
what which how many is are the a an of in on at to and or colour color shape shapes object
objects image picture question answer there left right top bottom middle centre center up
down big small large tiny circle square triangle star cross diamond red green blue yellow
purple orange black white grey gray pink brown one two three four five six seven eight nine
ten zero yes no rouge vert bleu jaune violet noir blanc gris rot grun blau gelb lila schwarz
weiss rojo verde azul amarillo morado negro blanco gris rosso giallo viola nero bianco
cerchio quadrato triangolo cercle carre triangle kreis quadrat dreieck circulo cuadrado
triangulo links rechts gauche droite izquierda derecha sinistra destra un deux trois eins
zwei drei uno dos tres due tre side describe count does look like this that it user
assistant system you helpful
""".split()


def corpus(extra_words: Iterable[str] = ()) -> list[str]:
    words = list(CORPUS_WORDS) + [w for w in extra_words if w]
    # Sentences in both plain and " word" (leading space) form, as BPE sees them in text.
    return [" ".join(words)] * 4 + [" " + w for w in words] * 2


def train_tokenizer(
    vocab_size: int,
    *,
    named_tokens: Mapping[str, str],
    special_tokens: Iterable[str] = (),
    extra_words: Iterable[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the corpus; ``named_tokens`` maps ``bos_token``/``eos_token``/
    ``pad_token``/``unk_token`` and any family-specific name (``image_token``, ...) to a token.

    Deterministic for its arguments. Every special token gets one id of its own.
    """
    specials = list(dict.fromkeys([*special_tokens, *named_tokens.values()]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # The whole byte alphabet is always in the vocabulary: no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(extra_words), trainer)
    standard = {k: v for k, v in named_tokens.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    extra = {k: v for k, v in named_tokens.items() if k not in standard}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens=extra,
        additional_special_tokens=[t for t in specials if t not in named_tokens.values()],
        **standard,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
