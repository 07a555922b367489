"""FedVLM hub: aggregates the shared LoRA factors and broadcasts the global ones."""
