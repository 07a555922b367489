"""How an (image, question, answer) becomes what a model of any family trains and answers on.

Everything is read from the model's own processor, never from a per-family rule:

* the **prompt** is the processor's chat template with the generation prompt (a model
  without one gets a plain ``<image>\\nQuestion: ...\\nAnswer:``);
* the **conversation** is the same template with the answer as the assistant's turn, put
  through the processor whole, so every per-token tensor (token types, Mllama's
  cross-attention mask) covers the answer exactly as the family expects;
* the **labels** are the conversation's tokens after the prompt, up to and including the
  template's own **end-of-turn token** (``<|im_end|>``, ``<end_of_utterance>``,
  ``<end_of_turn>``, ``<|eot_id|>``...); a template that ends turns with nothing of its own
  (LLaVA 1.5) gets the tokenizer's end-of-sequence token, as its checkpoints were trained.
  Generation stops at the same token, so training and inference agree;
* a processor that builds prompt and labels itself from a ``suffix`` (PaliGemma: the answer
  is a causal suffix after a bidirectional prefix, marked by ``token_type_ids``) is used
  that way.

The result is an :class:`~fedvlm.edge.batching.EncodedExample` holding every tensor the
processor returned that the model's forward takes.
"""

from __future__ import annotations

import inspect
import logging
from typing import Iterable, Sequence

import torch
from PIL import Image

from fedvlm.edge.errors import ChatFormatError
from fedvlm.edge.batching import IGNORE_INDEX, SEQUENCE_KEYS, EncodedExample, PaddingSide, collate_inputs

log = logging.getLogger(__name__)

# Stands in for an answer while the template is read; any plain word would do.
_PROBE_ANSWER = "fedvlmprobe"


def forward_input_names(model: torch.nn.Module) -> frozenset[str] | None:
    """The inputs a model's forward names (through a PEFT wrapper); None when unknown."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    return frozenset(name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD)


def _as_rgb(image) -> Image.Image:
    return image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")


class ChatFormat:
    """The prompt, label and stop-token conventions of one processor (see the module doc).

    ``input_names``: the inputs the model's forward takes (:func:`forward_input_names`);
    processor outputs outside it are dropped, with a warning naming them.
    """

    def __init__(self, processor, input_names: Iterable[str] | None = None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.input_names = frozenset(input_names) if input_names is not None else None
        self._warned: set[str] = set()
        self.uses_suffix = "suffix" in inspect.signature(type(processor).__call__).parameters
        self.template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self._answer_lead, self._turn_end, self.end_of_turn_id = self._read_template()
        if self.end_of_turn_id is None:
            self.end_of_turn_id = self.tokenizer.eos_token_id
        if self.end_of_turn_id is None:
            raise ChatFormatError("the tokenizer has no end-of-sequence token and the chat template no end-of-turn "
                             "token: FedVLM cannot tell where an answer ends")

    @classmethod
    def for_model(cls, processor, model: torch.nn.Module) -> "ChatFormat":
        return cls(processor, forward_input_names(model))

    # ---- texts ---------------------------------------------------------------------------------

    def prompt(self, question: str) -> str:
        question = question.strip()
        if self.uses_suffix:
            return question  # the processor adds the image tokens, BOS and the separator
        if self.template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{self.image_token}\nQuestion: {question}\nAnswer:"

    def conversation(self, question: str, answer: str) -> str:
        """The prompt, then the answer and the turn's end as the template writes them.

        Built on the prompt itself, so training sees exactly what generation starts from
        (some templates, LLaVA-OneVision's, open the assistant's turn slightly differently
        in a finished conversation than in the generation prompt).
        """
        answer = answer.strip()
        if self.uses_suffix or not self.template:
            return f"{self.prompt(question)} {answer}{self.tokenizer.eos_token or ''}"
        return f"{self.prompt(question)}{self._answer_lead}{answer}{self._turn_end}"

    # ---- tokens --------------------------------------------------------------------------------

    @property
    def stop_token_ids(self) -> list[int]:
        """Where generation ends: the end-of-turn token and the tokenizer's end-of-sequence."""
        ids = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, image, question: str, answer: str) -> EncodedExample:
        """The whole conversation, labelled on the answer and its end-of-turn token."""
        images = [[_as_rgb(image)]]
        if self.uses_suffix:
            inputs = dict(self.processor(images=images, text=[self.prompt(question)], suffix=[answer.strip()],
                                         return_tensors="pt"))
            labels = inputs.pop("labels")[0]
            return EncodedExample(self._kept(inputs), labels)
        prompt_ids = self.processor(images=images, text=[self.prompt(question)], return_tensors="pt")["input_ids"][0]
        inputs = dict(self.processor(images=images, text=[self.conversation(question, answer)], return_tensors="pt"))
        inputs.pop("labels", None)
        ids = inputs["input_ids"][0]
        start = _common_prefix_length(prompt_ids, ids)
        ends = (ids[start:] == self.end_of_turn_id).nonzero()
        if len(ends) == 0:
            raise ChatFormatError(f"the encoded answer {answer[:40]!r} has no end-of-turn token "
                             f"{self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)!r}: was it cut short?")
        end = start + int(ends[0]) + 1  # through the end-of-turn token; what the template adds after is dropped
        inputs = {k: (v[:, :end] if _is_per_token(k, v, len(ids)) else v) for k, v in inputs.items()}
        labels = torch.full((end,), IGNORE_INDEX, dtype=torch.long)
        labels[start:end] = ids[start:end]
        return EncodedExample(self._kept(inputs), labels)

    def encode_prompt(self, image, question: str) -> dict[str, torch.Tensor]:
        """What generation starts from: the prompt alone (batch axis 1)."""
        inputs = dict(self.processor(images=[[_as_rgb(image)]], text=[self.prompt(question)], return_tensors="pt"))
        inputs.pop("labels", None)
        return self._kept(inputs)

    def prompt_batch(self, images: Sequence, questions: Sequence[str], *,
                     padding_side: PaddingSide = "left") -> dict[str, torch.Tensor]:
        """Prompts for a batch of generation, left-padded as ``generate()`` expects."""
        rows = [self.encode_prompt(image, question) for image, question in zip(images, questions)]
        return collate_inputs(rows, self.tokenizer.pad_token_id, padding_side=padding_side)

    # ---- reading the template ------------------------------------------------------------------

    def _read_template(self) -> tuple[str, str, int | None]:
        """What the template writes around an assistant's answer: the text between the
        generation prompt and the answer, the text after the answer through its first special
        token, and that token (None when the template ends turns with nothing of its own)."""
        if not self.template or self.uses_suffix:
            return "", "", None
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": _PROBE_ANSWER}]}
        rendered = self.processor.apply_chat_template([user, answer])
        prompt = self.processor.apply_chat_template([user], add_generation_prompt=True)
        at = rendered.rindex(_PROBE_ANSWER)
        lead = rendered[len(prompt):at] if rendered.startswith(prompt) and len(prompt) <= at else ""
        tail = rendered[at + len(_PROBE_ANSWER):]
        # Turn markers are added tokens (special or not) in every family's tokenizer.
        markers = set(self.tokenizer.get_added_vocab().values()) | set(self.tokenizer.all_special_ids)
        text = ""
        for token_id in self.tokenizer(tail, add_special_tokens=False)["input_ids"]:
            text += self.tokenizer.decode([token_id])
            if token_id in markers:
                return lead, text, token_id
        return lead, self.tokenizer.eos_token or "", None

    def _kept(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.input_names is None:
            return inputs
        dropped = [k for k in inputs if k not in self.input_names]
        for key in dropped:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("the processor returns %r but the model's forward does not take it; it is left out", key)
        return {k: v for k, v in inputs.items() if k in self.input_names}


def _common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if len(differs) else n


def _is_per_token(key: str, value: torch.Tensor, length: int) -> bool:
    return key in SEQUENCE_KEYS and value.dim() >= 2 and value.shape[1] == length
