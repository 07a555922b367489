"""Load a transformers vision-language model from a local directory or the local HF cache, offline.

A device never reaches a model hub at run time: ``--model`` is a directory, or a Hugging
Face id (``HuggingFaceTB/SmolVLM-256M-Instruct``) found in the local cache; anything else
is a clear error, never a download. Any VLM the Auto classes know
(``AutoModelForImageTextToText`` + ``AutoProcessor``) loads; the tiny test models are
saved with ``save_pretrained`` and come back through exactly this code.
"""

from __future__ import annotations

from fedvlm.edge.errors import ModelLoadError

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from fedvlm.edge.torch_stack import check_torch_stack
from fedvlm.edge.quantization import (
    QuantizationMode,
    bitsandbytes_config,
    check_mode,
    default_quantization,
    modules_to_keep_full_precision,
)

# Sampled blocks per weight file for the fingerprint: enough to tell two checkpoints of the
# same architecture apart, without reading gigabytes at every start.
_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_BLOCK = 1 << 20




@dataclasses.dataclass
class LoadedVLM:
    """A model ready for training or inference, and what identifies its base weights."""

    model: torch.nn.Module
    processor: object
    model_dir: Path
    device: torch.device
    quantization: QuantizationMode
    fingerprint: str


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return resolved


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _from_local_cache(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id``, never a download; None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The folder of a saved model: ``model_dir`` itself, or the cached snapshot of a hub id."""
    path = Path(model_dir).expanduser()
    if not path.exists() and _looks_like_hub_id(str(model_dir)):
        cached = _from_local_cache(str(model_dir))
        if cached is None:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise ModelLoadError(
                f"model {str(model_dir)!r} is not a local directory and is not in the Hugging Face cache "
                f"({HF_HUB_CACHE}); FedVLM never downloads at run time: fetch it where there is a network "
                f"(`hf download {model_dir}`) and copy the cache here, or pass the directory of a saved model"
            )
        path = cached
    if not path.exists():
        raise ModelLoadError(
            f"model directory {str(path)!r} does not exist. FedVLM loads models from local "
            "directories or the local Hugging Face cache only (nothing is downloaded); build a test model "
            "with `fedvlm-edge make-tiny-model DIR` or point to a saved model."
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{str(path)!r} holds no config.json: it is not a saved transformers model "
            "(save one with model.save_pretrained(DIR) and processor.save_pretrained(DIR))."
        )
    return path


def _read_model_config(path: Path) -> dict:
    """``config.json`` of a model folder; a broken one is the folder's fault, not a bug."""
    try:
        return json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{str(path / 'config.json')!r} is not valid JSON ({exc}): the model folder is "
                             "damaged; save the model again or point to another folder") from None


def base_fingerprint(model_dir: str | os.PathLike) -> str:
    """A short stable id of the base weights: config plus sampled bytes of every weight file.

    Clients and hub compare it so that factors trained on different bases never mix.
    """
    path = check_model_dir(model_dir)
    digest = hashlib.sha256()
    config = _read_model_config(path)
    digest.update(json.dumps(config, sort_keys=True).encode())
    weight_files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    for weight_file in weight_files:
        size = weight_file.stat().st_size
        digest.update(f"{weight_file.name}:{size}".encode())
        with weight_file.open("rb") as handle:
            step = max(size // _FINGERPRINT_SAMPLES, 1)
            for offset in range(0, size, step):
                handle.seek(offset)
                digest.update(handle.read(_FINGERPRINT_BLOCK))
    return digest.hexdigest()[:16]


def _model_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def _not_a_vlm(path: Path, cause: Exception) -> ModelLoadError:
    """What transformers could not make of ``path``: the folder's fault, said in one line."""
    return ModelLoadError(f"could not load a vision-language model from {str(path)!r}: {cause}")


def _fp32_weight_bytes_and_keep_list(path: Path) -> tuple[int, list[str]]:
    """Size the model without allocating it, by building it on the meta device."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        skeleton = _model_class().from_config(config)
    n_params = sum(p.numel() for p in skeleton.parameters())
    return 4 * n_params, modules_to_keep_full_precision(skeleton)


def _keep_4bit_weights_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking NF4 weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first no-grad forward in eval mode repacks each 4-bit
    weight in place for ``gemv_4bit``, an op with no autograd formula. Training after an
    evaluation then back-propagates through it silently wrong (bitsandbytes 0.50 warns
    "an autograd kernel was not registered"): the gradients of every earlier layer's LoRA
    factors are garbage. A device alternates training and evaluation, so keep the
    differentiable layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_vlm(
    model_dir: str | os.PathLike,
    *,
    quantization: str = "auto",
    device: str | torch.device | None = "auto",
) -> LoadedVLM:
    """Load model and processor from ``model_dir`` with the base frozen and quantised.

    ``quantization``: ``auto`` (see :func:`fedvlm.edge.quantization.default_quantization`),
    ``none``, ``nf4`` or ``int8``.
    """
    path = check_model_dir(model_dir)
    target = resolve_device(device)
    check_torch_stack()
    from transformers import AutoProcessor

    try:
        fp32_bytes, keep_full_precision = _fp32_weight_bytes_and_keep_list(path)
    except (OSError, ValueError, KeyError) as exc:  # e.g. a config.json without model_type
        raise _not_a_vlm(path, exc) from exc
    mode = default_quantization(target, fp32_bytes) if quantization == "auto" else check_mode(quantization)
    kwargs: dict = {"local_files_only": True, "dtype": torch.float32}
    quant_config = bitsandbytes_config(mode, keep_full_precision)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        kwargs["device_map"] = {"": target.index if target.type == "cuda" and target.index else target.type}
    try:
        model = _model_class().from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError as exc:  # a package the family's processor needs, e.g. SmolVLM's num2words
        raise ModelLoadError(f"the model in {str(path)!r} needs a package that is not installed: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise _not_a_vlm(path, exc) from exc
    if quant_config is None:
        model.to(target)
    else:
        _keep_4bit_weights_differentiable(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return LoadedVLM(
        model=model,
        processor=processor,
        model_dir=path,
        device=target,
        quantization=mode,
        fingerprint=base_fingerprint(path),
    )
