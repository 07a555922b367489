"""Check that torch and torchvision belong together before transformers needs them.

transformers 5 builds the image processors of several families (Qwen2-VL, Qwen2.5-VL,
SmolVLM, LLaVA-OneVision, InternVL) with torchvision. A torchvision built for another torch
fails deep inside transformers' imports (``operator torchvision::nms does not exist``) and
takes every model class down with it; a missing one fails when the first such processor
loads. Both are install mistakes: say so in one line, with the fix.
"""

from __future__ import annotations

import functools
import importlib.util

from fedvlm.edge.errors import EdgeError


class TorchStackError(EdgeError):
    """torch and torchvision are missing or do not belong together."""


def matching_torchvision(torch_version: str) -> str:
    """The torchvision release built for a torch release (2.14 -> 0.29: minor + 15 since 2.0)."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    return f"0.{minor + 15}" if major == 2 else "the release built for it"


@functools.lru_cache(maxsize=1)
def check_torch_stack() -> None:
    """Raise :class:`TorchStackError` when torchvision is missing or built for another torch."""
    import torch

    torch_version = torch.__version__.split("+")[0]
    wanted = matching_torchvision(torch_version)
    fix = f"pip install 'torchvision=={wanted}.*' (the release built for torch {torch_version}), or pip install 'fedvlm[edge]'"
    try:
        missing = importlib.util.find_spec("torchvision") is None
    except ValueError:  # a module entry set to None: Python's own "not importable"
        missing = True
    if missing:
        raise TorchStackError(f"torchvision is not installed; transformers needs it for the image processors of "
                              f"several VLM families: {fix}")
    try:
        import torchvision
    except (ImportError, RuntimeError) as exc:  # RuntimeError: "operator torchvision::nms does not exist"
        raise TorchStackError(f"torchvision does not import beside torch {torch_version} ({exc}): {fix}") from None
    found = ".".join(torchvision.__version__.split("+")[0].split(".")[:2])
    if wanted.startswith("0.") and found != wanted:
        raise TorchStackError(f"torchvision {torchvision.__version__} is built for another torch than "
                              f"{torch.__version__}: {fix}")
