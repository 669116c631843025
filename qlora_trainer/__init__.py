"""qlora_trainer: memory-efficient QLoRA fine-tuning on one GPU (or the CPU for small models).

Heavy dependencies (bitsandbytes, triton, datasets) are imported lazily where they are used, so
``import qlora_trainer`` and ``qlora-trainer --help`` stay fast.
"""

__version__ = "0.1.0"
