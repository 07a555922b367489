"""A client's personalised adapter as an ONNX Runtime ``.onnx_adapter`` file.

The file (``onnxruntime.AdapterFormat``) holds the client's LoRA tensors (personal factors
with the current global ones, PEFT's own values: the graph applies ``alpha / r``), keyed by
the export's graph-input names. AdapterFormat's own metadata is two integers: the adapter
version is this file format's version and the model version is the first 28 bits of the
base fingerprint. Everything else lives in a JSON sidecar, ``<file>.json``: the full base
fingerprint, the LoRA layout hash, every tensor's name and shape, and the adapter file's
SHA-256 (so a truncated or altered file is refused before ONNX Runtime reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from fedvlm.edge.errors import EdgeError

ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_FORMAT_VERSION = 1


class OnnxAdapterError(EdgeError):
    """An adapter file is missing, corrupt, or made for another base model or LoRA layout."""


def sidecar_path(adapter_path: str | os.PathLike) -> Path:
    path = Path(adapter_path)
    return path.with_name(path.name + ".json")


def model_version(fingerprint: str) -> int:
    """The base fingerprint squeezed into AdapterFormat's integer model version (fits an int32)."""
    return int(fingerprint[:7], 16)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_adapter(path: str | os.PathLike, lora_state: Mapping[str, np.ndarray], manifest: dict) -> Path:
    """Write ``lora_state`` (PEFT keys, as ``PersonalVLM.adapter_state()``) for the export ``manifest``."""
    import onnxruntime as ort

    if manifest.get("merged"):
        raise OnnxAdapterError("a merged export has no LoRA inputs: export the base with adapters instead")
    by_peft = {entry["peft_key"]: name for name, entry in manifest["lora_inputs"].items()}
    if set(lora_state) != set(by_peft):
        extra, missing = sorted(set(lora_state) - set(by_peft)), sorted(set(by_peft) - set(lora_state))
        raise OnnxAdapterError(
            f"the adapter does not match the export's LoRA layout (unexpected {extra[:3]}, missing {missing[:3]})"
        )
    # OrtValues made from numpy arrays do not copy: ``arrays`` keeps them alive until written.
    arrays = {}
    for key, name in by_peft.items():
        array = np.ascontiguousarray(lora_state[key], dtype=np.float32)
        expected = tuple(manifest["lora_inputs"][name]["shape"])
        if array.shape != expected:
            raise OnnxAdapterError(f"adapter tensor {key!r} has shape {array.shape}, the export expects {expected}")
        arrays[name] = array
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_FORMAT_VERSION)
    adapter.set_model_version(model_version(manifest["base_fingerprint"]))
    adapter.set_parameters(values)
    adapter.export_adapter(str(out))
    del values, arrays
    sidecar = {
        "adapter_format_version": ADAPTER_FORMAT_VERSION,
        "base_fingerprint": manifest["base_fingerprint"],
        "lora_config_hash": manifest["lora_config_hash"],
        "tensors": {name: list(manifest["lora_inputs"][name]["shape"]) for name in sorted(manifest["lora_inputs"])},
        "sha256": _sha256(out),
    }
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    return out


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an adapter file (graph-input names -> arrays), as written."""
    import onnxruntime as ort

    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:  # ORT raises plain RuntimeErrors on unreadable flatbuffers
        raise OnnxAdapterError(f"{str(path)!r} is not a readable ONNX adapter file: {exc}") from None
    return {name: np.array(value.numpy()) for name, value in params.items()}


def check_adapter(path: str | os.PathLike, manifest: dict) -> Path:
    """Refuse an adapter that is missing, corrupt, or not made for this export; return its path."""
    adapter = Path(path)
    if not adapter.is_file():
        raise OnnxAdapterError(f"adapter file {str(adapter)!r} does not exist")
    sidecar_file = sidecar_path(adapter)
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except FileNotFoundError:
        raise OnnxAdapterError(
            f"adapter {str(adapter)!r} has no metadata file {sidecar_file.name!r} beside it: write adapters "
            "with fedvlm.edge.onnx_adapter.write_adapter"
        ) from None
    except json.JSONDecodeError as exc:
        raise OnnxAdapterError(f"adapter metadata {str(sidecar_file)!r} is corrupt: {exc}") from None
    if sidecar.get("adapter_format_version") != ADAPTER_FORMAT_VERSION:
        raise OnnxAdapterError(f"adapter {str(adapter)!r} has format version {sidecar.get('adapter_format_version')}, "
                               f"this SDK reads {ADAPTER_FORMAT_VERSION}")
    if sidecar.get("sha256") != _sha256(adapter):
        raise OnnxAdapterError(f"adapter file {str(adapter)!r} is corrupt: its checksum does not match its metadata")
    if sidecar.get("base_fingerprint") != manifest["base_fingerprint"]:
        raise OnnxAdapterError(
            f"adapter {str(adapter)!r} was made for base model {sidecar.get('base_fingerprint')}, but this ONNX "
            f"export is of base {manifest['base_fingerprint']}"
        )
    if sidecar.get("lora_config_hash") != manifest["lora_config_hash"]:
        raise OnnxAdapterError(
            f"adapter {str(adapter)!r} has another LoRA layout (config hash {sidecar.get('lora_config_hash')}, "
            f"the export's is {manifest['lora_config_hash']})"
        )
    import onnxruntime as ort

    try:
        format_ = ort.AdapterFormat.read_adapter(str(adapter))
        params = format_.get_parameters()
    except Exception as exc:
        raise OnnxAdapterError(f"{str(adapter)!r} is not a readable ONNX adapter file: {exc}") from None
    if format_.get_model_version() != model_version(manifest["base_fingerprint"]):
        raise OnnxAdapterError(f"adapter {str(adapter)!r} was written for another base model (model version "
                               f"{format_.get_model_version()})")
    expected = {name: tuple(entry["shape"]) for name, entry in manifest["lora_inputs"].items()}
    found = {name: tuple(value.shape()) for name, value in params.items()}
    if set(found) != set(expected):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise OnnxAdapterError(
            f"adapter {str(adapter)!r} does not hold this export's LoRA tensors (unexpected {extra[:3]}, "
            f"missing {missing[:3]})"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise OnnxAdapterError(f"adapter tensor {name!r} has shape {found[name]}, the export expects {shape}")
    return adapter
