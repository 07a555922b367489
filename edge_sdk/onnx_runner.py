"""Local inference with ONNX Runtime: the exported base, a swappable adapter, greedy decoding.

    vlm = OnnxVLM.load("export/")
    vlm.activate("alice.onnx_adapter")       # None: the base model
    vlm.answer(image, "what colour is it?")

The prompt is built exactly as in training (:class:`fedvlm.edge.chat_format.ChatFormat`,
left-padded batches, the family's own processor tensors); the prompt runs once through the
prefill graph, then one token per decode step with the key/value cache, as ``generate()``
does greedily: positions from the model's own code (:class:`GenerationPositions`), rows that
finished are fed the pad token, and answers end at the template's end-of-turn token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fedvlm.edge.onnx_adapter import check_adapter
from fedvlm.edge.onnx_families import GraphFamily, graph_family
from fedvlm.edge.onnx_export import DECODE_FILE, PREFILL_FILE, OnnxExportError, kv_names, read_manifest
from fedvlm.edge.onnx_wrapper import POSITION_IDS, GenerationPositions


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxVLM:
    """The exported prefill and decode graphs with the processor saved beside them."""

    def __init__(self, onnx_dir: Path, manifest: dict, prefill, decode, processor, positions: GenerationPositions,
                 family: GraphFamily | None = None):
        from fedvlm.edge.chat_format import ChatFormat

        self.onnx_dir = onnx_dir
        self.manifest = manifest
        self.prefill = prefill
        self.decode = decode
        self.processor = processor
        self.prompt_format = ChatFormat(processor)
        self.positions = positions
        self.family = family or GraphFamily()
        self.n_layers = manifest["n_layers"]
        self.adapter_path: Path | None = None
        self._run_options = None
        self._adapter = None

    @classmethod
    def load(cls, onnx_dir: str | os.PathLike, providers: Sequence[str] | None = None) -> "OnnxVLM":
        import onnxruntime as ort
        from transformers import AutoConfig, AutoProcessor

        path = Path(onnx_dir)
        manifest = read_manifest(path)
        for name in (PREFILL_FILE, DECODE_FILE):
            if not (path / name).is_file():
                raise OnnxExportError(f"ONNX export {str(path)!r} lacks {name}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA inputs with defaults are meant: no warning per input
        chosen = list(providers) if providers else default_providers()
        prefill = ort.InferenceSession(str(path / PREFILL_FILE), options, providers=chosen)
        decode = ort.InferenceSession(str(path / DECODE_FILE), options, providers=chosen)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return cls(path, manifest, prefill, decode, processor, _positions(path, manifest, config), graph_family(config))

    @property
    def has_adapters(self) -> bool:
        return not self.manifest["merged"]

    def activate(self, adapter_path: str | os.PathLike | None) -> None:
        """Answer with this adapter from now on (None: the base model with no adapter)."""
        import onnxruntime as ort

        if adapter_path is None:
            self._adapter, self._run_options, self.adapter_path = None, None, None
            return
        if not self.has_adapters:
            raise OnnxExportError(f"{str(self.onnx_dir)!r} is a merged export: it takes no adapter")
        path = check_adapter(adapter_path, self.manifest)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        self._adapter, self._run_options, self.adapter_path = adapter, run_options, path

    def _prefill(self, inputs: dict) -> tuple[list[np.ndarray], np.ndarray]:
        """Prompts (the processor's tensors) through the prefill graph: its outputs and their positions."""
        positions = self.positions.prefill(inputs)
        feeds = self.family.graph_feeds({**inputs, POSITION_IDS: positions})
        feeds = {k: np.ascontiguousarray(feeds[k].numpy()) for k in self.manifest["prefill_inputs"]}
        return self.prefill.run(None, feeds, self._run_options), positions.numpy()

    def prefill_batch(self, images: Sequence, questions: Sequence[str]):
        """The prompts through the prefill graph, left-padded into one batch as ``generate()``
        holds it: ``(outputs [logits, present_key_0, ...], attention mask, positions)``.

        A family whose graph takes a batch (:attr:`GraphFamily.batches_prompts`) runs once on
        the processor's left-padded batch. The others run one prompt at a time (their graph
        takes one picture: their image code keeps Python lists per picture), and the rows are
        left-padded after: padding slots hold zeros, and the mask keeps every later token from
        attending to them."""
        images = [self.family.picture(image) for image in images]
        if self.family.batches_prompts:
            inputs = self.prompt_format.prompt_batch(images, questions)
            outputs, positions = self._prefill(inputs)
            # Positions only carry on from each row's last one: [batch, 1] (or [axes, batch, 1]).
            return outputs, inputs["attention_mask"].numpy(), positions[..., -1:]
        rows = [self._prefill(self.prompt_format.encode_prompt(image, question))
                for image, question in zip(images, questions)]  # fmt: skip
        length = max(out[0].shape[1] for out, _ in rows)

        def left_pad(array: np.ndarray, axis: int) -> np.ndarray:
            widths = [(0, 0)] * array.ndim
            widths[axis] = (length - array.shape[axis], 0)
            return np.pad(array, widths)

        outputs = [np.concatenate([left_pad(out[i], axis=1 if i == 0 else 2) for out, _ in rows])
                   for i in range(len(rows[0][0]))]  # fmt: skip
        mask = np.concatenate([left_pad(np.ones((1, out[0].shape[1]), dtype=np.int64), 1) for out, _ in rows])
        # Positions only carry on from each row's last one: [batch, 1] (or [axes, batch, 1]).
        positions = np.concatenate([p[..., -1:] for _, p in rows], axis=-2)
        return outputs, mask, positions

    def generate(self, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 8) -> np.ndarray:
        """Greedy new token ids ``[batch, <= max_new_tokens]``, padded after each row's end."""
        pad = self.processor.tokenizer.pad_token_id
        stop = np.array(self.prompt_format.stop_token_ids)
        outputs, mask, positions = self.prefill_batch(images, questions)
        batch = mask.shape[0]
        finished = np.zeros(batch, dtype=bool)
        tokens: list[np.ndarray] = []
        past_names = kv_names("past", self.n_layers)
        for step in range(max_new_tokens):
            next_token = outputs[0][:, -1].argmax(-1).astype(np.int64)
            if pad is not None:
                next_token = np.where(finished, pad, next_token)
            tokens.append(next_token)
            finished |= np.isin(next_token, stop)
            if finished.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = self.positions.next(positions)
            feeds = {"input_ids": next_token[:, None], "attention_mask": mask, POSITION_IDS: positions}
            feeds.update(zip(past_names, outputs[1:]))
            outputs = self.decode.run(None, feeds, self._run_options)
        return np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), dtype=np.int64)

    def answers(self, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 8) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        new_tokens = self.generate(images, questions, max_new_tokens=max_new_tokens)
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def answer(self, image, question: str, *, max_new_tokens: int = 8) -> str:
        return self.answers([image], [question], max_new_tokens=max_new_tokens)[0]


def _positions(onnx_dir: Path, manifest: dict, config) -> GenerationPositions:
    """The exported model's own position code, on its saved config."""
    import transformers

    model_class = getattr(transformers, manifest["model_class"], None)
    if model_class is None:
        raise OnnxExportError(f"ONNX export {str(onnx_dir)!r} is of a {manifest['model_class']}, which this "
                              f"transformers ({transformers.__version__}) does not have")
    return GenerationPositions(model_class, config)
