"""ONNX translations of the ops torch's ONNX exporter has none for (imported only to export).

``aten._is_all_true`` comes from the families' ``torch_compilable_check`` that the image
tokens and image features agree in number: ``all(x)`` is ``not any(not x)``.
"""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import BOOL


@onnxscript.script()
def is_all_true(x: BOOL) -> BOOL:
    # to=7: INT64
    return op.Not(op.ReduceMax(op.Cast(op.Not(x), to=7), keepdims=0) > op.Constant(value_int=0))


TRANSLATIONS = {torch.ops.aten._is_all_true.default: is_all_true}
