"""Tiny random-weight models of the VLM families FedVLM supports (``fedvlm-edge make-tiny-model --arch``).

Nothing may be downloaded at run time, so tests, demos and benchmarks build their models
here: :mod:`.families` holds one recipe per family, :mod:`.tokenizer` trains each
family's tokenizer, :mod:`.chat_templates` holds the families' published templates. The
entry points are :func:`fedvlm.edge.tiny_model.build_tiny_vlm` and ``make_tiny_model``.
"""
