"""Export a personalised VLM to ONNX: a prefill graph and a decode-step graph.

Layout of the export directory::

    prefill.onnx     (input_ids, attention_mask, <the family's image inputs...>, position_ids)
                     -> logits, present_key_<i>, present_value_<i>
    decode.onnx      (input_ids [batch, 1], attention_mask, position_ids, past_key_<i>, past_value_<i>)
                     -> logits, present_...
    export.json      base fingerprint, the model class, the prefill inputs, the LoRA layout and
                     its hash, the LoRA inputs and their PEFT names
    config.json      the model's config (the runner computes positions with the model's own code)
    processor files  (tokenizer, image processor) saved beside, for the runner's preprocessing

Both graphs trace the family's own forward (:mod:`fedvlm.edge.onnx_wrapper`); the prefill
takes every tensor the family's processor returns that the forward uses (pixel values in the
family's layout, Idefics3's ``pixel_attention_mask``, Gemma's ``token_type_ids``...).
:data:`NOT_EXPORTABLE` names the families whose forward does not trace, with the reason.

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
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from fedvlm.edge.errors import EdgeError
from fedvlm.edge.onnx_families import GraphFamily, graph_family
from fedvlm.edge.onnx_wrapper import POSITION_IDS, DecodeGraph, GenerationPositions, PrefillGraph, base_model

PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
MANIFEST_FILE = "export.json"
EXPORT_FORMAT = 2

# Families whose forward torch.export cannot trace yet (``config.model_type`` -> why).
NOT_EXPORTABLE = {
    "mllama": "torch's ONNX exporter cannot convert its cross-attention code",
}


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


def check_exportable(model: torch.nn.Module) -> None:
    """One line for a family that cannot be exported, naming what works instead."""
    model_type = base_model(model).config.model_type
    if model_type in NOT_EXPORTABLE:
        raise OnnxExportError(
            f"ONNX export does not support the {model_type} family yet ({NOT_EXPORTABLE[model_type]}); "
            "answer with the PyTorch model instead (PersonalVLM.answer, or `fedvlm-edge train --eval-data`)"
        )


def _example_inputs(personal, positions: GenerationPositions, family: GraphFamily) -> dict[str, torch.Tensor]:
    """Prompts with their pictures, and their positions, for tracing the prefill.

    Most families' prefill takes one picture (batch 1): their image code keeps a Python list
    per picture, which torch.export fixes at the traced length, so the runner prefills a
    batch row by row and decodes it together. A family whose graph packs pictures
    (``family.batches_prompts``) is traced on a left-padded batch of two pictures of different
    sizes, so its batch axis stays free.
    """
    from PIL import Image

    from fedvlm.edge.chat_format import ChatFormat

    chat = ChatFormat.for_model(personal.processor, personal.model)
    pictures = [family.picture(Image.new("RGB", size, colour)) for size, colour in
                [((48, 24), (40, 100, 200)), ((30, 70), (200, 60, 20))]]  # fmt: skip
    questions = ["what colour is it?", "what shape is this?"]
    if family.batches_prompts:
        inputs = chat.prompt_batch(pictures, questions)
    else:
        inputs = chat.encode_prompt(pictures[0], questions[0])
    return family.graph_feeds({**inputs, POSITION_IDS: positions.prefill(inputs)})


def _every_axis_dynamic(tensors) -> list[dict]:
    """torch.export finds which axes are really free (``Dim.AUTO``) and ties equal ones. An axis
    of length 1 stays 1: the decode step's one new token (attention is not causal within it)."""
    return [{axis: torch.export.Dim.AUTO for axis in range(t.dim()) if t.shape[axis] != 1} for t in tensors]


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
        except torch.onnx.OnnxExporterError as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
            first = text.splitlines()[0] if text else type(exc).__name__
            raise OnnxExportError(f"ONNX export of {type(base_model(module.model)).__name__} failed: {first}") from exc
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
        custom_translation_table=_translations(),
        verbose=False,
    )


def _translations() -> dict:
    from fedvlm.edge.onnx_ops import TRANSLATIONS

    return TRANSLATIONS


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
    check_exportable(peft_model)
    out.mkdir(parents=True, exist_ok=True)
    device = params[0].device
    was_training = peft_model.training
    peft_model.eval()
    source = merged_copy(peft_model).cpu() if merged else peft_model.cpu()
    try:
        positions = GenerationPositions.like(source)
        family = graph_family(base_model(source).config)
        example = _example_inputs(personal, positions, family)
        prefill = PrefillGraph(source, list(example), family).eval()
        decode = DecodeGraph(source).eval()
        n_layers = prefill.n_layers
        lora_names = {} if merged else lora_input_names(peft_model, prefill, sorted(lora_state))
        present = kv_names("present", n_layers)
        with torch.no_grad(), family.exporting(base_model(source)):
            prefill_args = tuple(example.values())
            _export(prefill, prefill_args, list(example), ["logits", *present],
                    (tuple(_every_axis_dynamic(prefill_args)),), out / PREFILL_FILE)  # fmt: skip
            # The decode step takes a batch: two copies of the example's cache.
            logits, *cache = (torch.cat([t, t]) for t in prefill(*prefill_args))
            step_ids = logits[:, -1:].argmax(-1)
            step_mask = torch.cat([example["attention_mask"].repeat(2, 1), torch.ones_like(step_ids)], dim=1)
            step_positions = positions.next(torch.cat([example[POSITION_IDS]] * 2, dim=-2))
            decode_args = (step_ids, step_mask, step_positions, *cache)
            _export(decode, decode_args, [*DecodeGraph.INPUTS, *kv_names("past", n_layers)], ["logits", *present],
                    (*_every_axis_dynamic(decode_args[:3]), tuple(_every_axis_dynamic(decode_args[3:]))),
                    out / DECODE_FILE)  # fmt: skip
        if not merged:
            for name in (PREFILL_FILE, DECODE_FILE):
                _expose_lora_inputs(out / name, lora_names, zero_b=True)
    finally:
        peft_model.to(device)
        if was_training:
            peft_model.train()
    personal.processor.save_pretrained(out)
    base = base_model(source)
    base.config.save_pretrained(out)
    manifest = {
        "format": EXPORT_FORMAT,
        "merged": merged,
        "base_fingerprint": personal.fingerprint,
        "model_class": type(base).__name__,
        "prefill_inputs": list(example),
        # LLaVA-NeXT/OneVision: the one picture size the graphs answer at (pictures are resized).
        "fixed_picture_size": family.fixed_picture_size,
        "lora": personal.lora.to_dict(),
        "lora_config_hash": personal.lora.config_hash(),
        "n_layers": n_layers,
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
