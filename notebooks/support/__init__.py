"""Logic behind the research notebooks (``notebooks/*.ipynb``): the notebooks stay thin and call these.

- :mod:`~qlora_trainer.research.quant_error`: NF4 / FP4 / Int4 blockwise quantization error.
- :mod:`~qlora_trainer.research.small_lm`: a small Llama pretrained on tinyshakespeare (cached).
- :mod:`~qlora_trainer.research.finetune`: full fine-tuning / 16-bit LoRA / QLoRA on a held-out task.
- :mod:`~qlora_trainer.research.paths`: cache and figure directories.
"""
