"""FedVLM edge SDK: runs on a device. Quantised local pLoRA training, personal state kept
on the device, updates over MQTT, ONNX export and local inference."""
