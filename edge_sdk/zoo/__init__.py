"""Tiny random-weight models of the VLM families FedVLM supports (``fedvlm-edge make-tiny-model --arch``).

Nothing may be downloaded at run time, so tests, demos and benchmarks build their models
here: :mod:`.families` holds one recipe per family, :mod:`.tokenizer` trains each
family's tokenizer, :mod:`.chat_templates` holds the families' published templates. The
entry points are :func:`fedvlm.edge.tiny_model.build_tiny_vlm` and ``make_tiny_model``.
"""

# Which transformers family each architecture name builds, and the checkpoints users bring.
ARCHITECTURES: dict[str, str] = {
    "llava": "LLaVA 1.5 (llava-hf/llava-1.5-7b-hf)",
    "llava_next": "LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf)",
    "llava_onevision": "LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf)",
    "idefics3": "Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3)",
    "smolvlm": "SmolVLM (HuggingFaceTB/SmolVLM-256M/500M-Instruct, SmolVLM-Instruct)",
    "qwen2_vl": "Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct)",
    "qwen2_5_vl": "Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct)",
    "paligemma": "PaliGemma / PaliGemma 2 (google/paligemma2-3b-pt-224)",
    "gemma3": "Gemma 3 (google/gemma-3-4b-it)",
    "internvl": "InternVL 3 (OpenGVLab/InternVL3-1B-hf)",
    "mllama": "Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct)",
}
