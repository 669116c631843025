"""Datasets: sources -> formats (render + loss mask) -> tokenized rows -> batches.

Contract used by the trainer, benchmarks and notebooks:
``build_datasets(cfg, tokenizer, *, seed) -> (train, eval_or_None)`` and
``make_dataloader(dataset, *, cfg, tokenizer, batch_size, shuffle, seed, epoch=0)``.
"""

from qlora_trainer.data.collate import block_causal_mask, make_dataloader
from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.data.pipeline import build_datasets, prepare

__all__ = ["IGNORE_INDEX", "block_causal_mask", "build_datasets", "make_dataloader", "prepare"]
