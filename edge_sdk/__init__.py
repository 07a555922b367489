"""FedVLM edge SDK: runs on a device. Quantised local pLoRA training, personal state kept
on the device, updates over MQTT, ONNX export and local inference."""

import logging as _logging

# bitsandbytes, imported by PEFT, logs on import that its CPU kernels would be faster with
# the `kernels` package, which downloads code from a model hub at run time: not something
# a device should do, so the hint is noise here.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
