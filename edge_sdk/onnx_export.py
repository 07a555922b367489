"""Export a personalised LLaVA to ONNX: a prefill graph and a decode-step graph.

Layout of the export directory::

    prefill.onnx     (input_ids, attention_mask, pixel_values) -> logits, present_key_<i>, present_value_<i>
    decode.onnx      (input_ids [batch, 1], attention_mask, past_key_<i>, past_value_<i>) -> logits, present_...
    export.json      base fingerprint, LoRA layout and its hash, the LoRA inputs and their PEFT names
    processor files  (tokenizer, image processor) saved beside, for the runner's preprocessing

Adapter export (the default): every LoRA factor is a graph input with a default (an
initializer that is also an input), which ONNX Runtime's LoRA adapters
(``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``) override at run time. The
defaults are PEFT's initial A and B = 0, so with no adapter active the graphs compute the
base model. The LoRA scaling ``alpha / r`` stays in the graph, so an adapter file holds
PEFT's own tensors unchanged.

Merged export: the given adapter is folded into the weights (``W + (alpha/r) B A``) and the
graphs have no LoRA inputs: one self-contained model for runtimes without adapter support.

``torch.onnx.export(dynamo=True, optimize=False, do_constant_folding=False)``: with the
optimiser or constant folding, the LoRA weights are folded into anonymous constants.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from fedvlm.edge.errors import EdgeError
from fedvlm.edge.onnx_wrapper import DecodeStepWrapper, PrefillWrapper

PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
MANIFEST_FILE = "export.json"
EXPORT_FORMAT = 1


class OnnxExportError(EdgeError):
    """The model cannot be exported to ONNX as asked."""


def kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _peft_param_name(state_key: str) -> str:
    """PEFT's state-dict key (``...lora_A.weight``) -> its parameter name (``...lora_A.default.weight``)."""
    head, _, leaf = state_key.rpartition(".")
    return f"{head}.default.{leaf}"


def lora_input_names(peft_model: torch.nn.Module, wrapper: torch.nn.Module, state_keys) -> dict[str, str]:
    """PEFT state-dict key -> the ONNX initializer name of the same parameter (by identity)."""
    by_id = {id(p): name for name, p in wrapper.named_parameters(remove_duplicate=False)}
    peft_params = dict(peft_model.named_parameters())
    mapping = {}
    for key in state_keys:
        param = peft_params.get(_peft_param_name(key))
        if param is None or id(param) not in by_id:
            raise OnnxExportError(f"LoRA tensor {key!r} has no parameter in the export wrapper")
        mapping[key] = by_id[id(param)]
    return mapping


def _example_inputs(personal, batch: int = 2) -> dict[str, torch.Tensor]:
    """A left-padded batch (rows of different lengths) for tracing: batch >= 2 keeps the axis dynamic."""
    from PIL import Image

    from fedvlm.edge.chat_format import ChatFormat

    processor = personal.processor
    # Any size: the processor resizes to the model's resolution.
    images = [Image.new("RGB", (32, 32), (40 * i, 100, 200 - 40 * i)) for i in range(batch)]
    questions = ["what colour is it?" + " please" * i for i in range(batch)]
    return ChatFormat(processor).prompt_batch(images, questions)


def _export(module, args, input_names, output_names, dynamic_shapes, path: Path) -> None:
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    # It warns that torchvision (never used here) is not installed, once per export.
    registration_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # Exporter noise with nothing for a user to do: torch's pytree deprecation, and a note
        # that our axis names are replaced by the equal axes torch.export found.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares.*", category=UserWarning)
        try:
            program = _torch_export(module, args, input_names, output_names, dynamic_shapes)
        finally:
            registration_log.setLevel(previous_level)
    program.save(str(path))


def _torch_export(module, args, input_names, output_names, dynamic_shapes):
    return torch.onnx.export(
        module,
        args,
        dynamo=True,
        optimize=False,
        do_constant_folding=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )


def _expose_lora_inputs(path: Path, lora_names: dict[str, str], zero_b: bool) -> None:
    """Make each LoRA initializer a graph input with a default; B's default is zero (= base)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    wanted = set(lora_names.values())
    existing_inputs = {i.name for i in model.graph.input}
    found = set()
    for init in model.graph.initializer:
        if init.name not in wanted:
            continue
        found.add(init.name)
        if zero_b and ".lora_B." in init.name:
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(array), init.name))
        if init.name not in existing_inputs:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    missing = wanted - found
    if missing:
        raise OnnxExportError(
            f"{len(missing)} LoRA tensors were not exported as named initializers (e.g. {sorted(missing)[0]!r}); "
            "constant folding may have absorbed them"
        )
    onnx.save(model, str(path))


def merged_copy(peft_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the base model with the active adapter folded into its weights."""
    return copy.deepcopy(peft_model).merge_and_unload()


def export_onnx(personal, out_dir: str | os.PathLike, *, merged: bool = False) -> Path:
    """Export ``personal`` (a :class:`fedvlm.edge.personal_model.PersonalVLM`, fp32) to ``out_dir``.

    ``merged=False``: the base with swappable LoRA inputs (no adapter active = base model).
    ``merged=True``: ``personal``'s current adapter folded into the weights.
    """
    from fedvlm.edge.adapters import adapter_state

    out = Path(out_dir)
    peft_model = personal.model
    params = list(peft_model.parameters())
    if any(p.dtype != torch.float32 for p in params) or personal.loaded.quantization != "none":
        raise OnnxExportError("ONNX export needs the fp32 model: load it with quantization='none'")
    if getattr(personal, "mixing", None) is not None:
        raise OnnxExportError("FedDPA weighs its global and personal adapters per input, which an ONNX export does "
                              "not carry; use the PyTorch model (PersonalVLM.answer) for FedDPA devices")  # fmt: skip
    state = personal.adapter_state()
    lora_state = adapter_state(peft_model)
    if set(state) != set(lora_state):
        raise OnnxExportError(
            "this strategy's state holds base deltas besides LoRA factors; ONNX adapters carry LoRA factors only"
        )
    out.mkdir(parents=True, exist_ok=True)
    device = params[0].device
    was_training = peft_model.training
    peft_model.eval()
    source = merged_copy(peft_model).cpu() if merged else peft_model.cpu()
    try:
        prefill = PrefillWrapper(source).eval()
        decode = DecodeStepWrapper(source).eval()
        n_layers = prefill.n_layers
        lora_names = {} if merged else lora_input_names(peft_model, prefill, sorted(lora_state))
        example = _example_inputs(personal)
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
        present = kv_names("present", n_layers)
        with torch.no_grad():
            _export(
                prefill,
                (example["input_ids"], example["attention_mask"], example["pixel_values"]),
                ["input_ids", "attention_mask", "pixel_values"],
                ["logits", *present],
                {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "pixel_values": {0: batch}},
                out / PREFILL_FILE,
            )
            prefill_out = prefill(example["input_ids"], example["attention_mask"], example["pixel_values"])
            past_len = torch.export.Dim("past", min=2)
            step_ids = prefill_out[0][:, -1:].argmax(-1)
            step_mask = torch.cat([example["attention_mask"], torch.ones_like(step_ids)], dim=1)
            past = list(prefill_out[1:])
            kv_shape = {0: batch, 2: past_len}
            _export(
                decode,
                (step_ids, step_mask, *past),
                ["input_ids", "attention_mask", *kv_names("past", n_layers)],
                ["logits", *present],
                # ``*past_flat`` is one argument to torch.export: its shapes go in one tuple.
                ({0: batch}, {0: batch, 1: past_len + 1}, tuple(kv_shape for _ in past)),
                out / DECODE_FILE,
            )
        if not merged:
            for name in (PREFILL_FILE, DECODE_FILE):
                _expose_lora_inputs(out / name, lora_names, zero_b=True)
    finally:
        peft_model.to(device)
        if was_training:
            peft_model.train()
    personal.processor.save_pretrained(out)
    manifest = {
        "format": EXPORT_FORMAT,
        "merged": merged,
        "base_fingerprint": personal.fingerprint,
        "lora": personal.lora.to_dict(),
        "lora_config_hash": personal.lora.config_hash(),
        "n_layers": n_layers,
        "image_token_id": int(prefill.llava.config.image_token_id),
        "lora_inputs": {
            onnx_name: {"peft_key": key, "shape": list(lora_state[key].shape)} for key, onnx_name in lora_names.items()
        },
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def read_manifest(onnx_dir: str | os.PathLike) -> dict:
    path = Path(onnx_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise OnnxExportError(f"{str(Path(onnx_dir))!r} is not an ONNX export: no {MANIFEST_FILE}") from None
    except json.JSONDecodeError as exc:
        raise OnnxExportError(f"{str(path)!r} is corrupt: {exc}") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise OnnxExportError(f"{str(path)!r} has export format {manifest.get('format')}, this SDK reads {EXPORT_FORMAT}")
    return manifest
