"""ONNX translations of the ops torch's ONNX exporter has none for (imported only to export).

``aten._is_all_true`` comes from the families' ``torch_compilable_check`` that the image
tokens and image features agree in number: ``all(x)`` is ``not any(not x)``.

``aten.conv3d`` (Qwen2-VL's patch embedding): onnxscript's own translation gives a conv3d
without bias a zero bias of shape ``[out_channels, 2]``, which ONNX Runtime rejects; ONNX's
``Conv`` takes no bias at all instead.
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


def conv3d(input, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1):
    bias_input = () if bias is None else (bias,)
    return op.Conv(input, weight, *bias_input, strides=list(stride), pads=[*padding, *padding],
                   dilations=list(dilation), group=groups)  # fmt: skip


TRANSLATIONS = {torch.ops.aten._is_all_true.default: is_all_true, torch.ops.aten.conv3d.default: conv3d}
