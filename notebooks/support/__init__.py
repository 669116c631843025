"""Logic behind the research notebooks (``notebooks/*.ipynb``): the notebooks stay thin and call these.

- :mod:`~support.quant_error`: NF4 / FP4 / Int4 blockwise quantization error.
- :mod:`~support.small_lm`: a small Llama pretrained on tinyshakespeare (cached).
- :mod:`~support.finetune`: full fine-tuning / 16-bit LoRA / QLoRA on a held-out task.
- :mod:`~support.paths`: cache and figure directories.
"""
