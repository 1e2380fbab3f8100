"""Local Hugging Face backends (extra ``[local]``): transformers, sentence-transformers, diffusers.

Every model argument is a Hugging Face id (``"HuggingFaceTB/SmolVLM-256M-Instruct"``) or a local
directory saved with ``save_pretrained``; both go through the same ``from_pretrained`` call.
"""
