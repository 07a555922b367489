"""What the edge and the hub must agree on: the wire protocol, the tensor codec, the
pLoRA key split and the strategies' math. Depends on numpy and safetensors only."""
