"""FedVLM: personalised federated fine-tuning of vision-language models (pLoRA).

Sub-packages: ``fedvlm.shared`` (what edge and hub agree on), ``fedvlm.edge`` (the device
SDK) and ``fedvlm.hub`` (the aggregation service). This top package holds what sits above
both: whole-federation simulation and the demo.
"""

__version__ = "0.1.0"
