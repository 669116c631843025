"""Mean loss and perplexity on a dataset, through the training data pipeline and loss masks.

The records go through ``data.build_datasets`` with the run's ``data`` section (same rendering,
template, truncation and completion-only labels as training), the batches through
``data.make_dataloader`` and the loss through ``train.loop.evaluate`` (``causal_lm_loss``: the
token mean over loss-carrying tokens, dropout off, RNG untouched). ``perplexity = exp(mean loss)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qlora_trainer.config import Config


class _Autocast:
    """What ``train.loop.evaluate`` needs of an Accelerator: ``autocast()``, bf16 on CUDA as in training."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def autocast(self) -> Any:
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def eval_dataset(cfg: "Config", tokenizer: Any) -> tuple[Any, str]:
    """The run's eval split (``data.eval_path`` / ``data.eval_fraction``), else its training data;
    returns (dataset, which: ``eval`` | ``train``)."""
    from qlora_trainer.data import build_datasets

    train, ev = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    return (ev, "eval") if ev is not None and len(ev) else (train, "train")


def dataset_loss(model: torch.nn.Module, cfg: "Config", tokenizer: Any, *, max_batches: int = 0) -> dict:
    """``{"loss", "perplexity", "split", "batches"}`` of ``model`` on the run's eval data
    (``max_batches`` batches of ``train.batch_size``; 0 = all)."""
    from dataclasses import replace

    from qlora_trainer.train.loop import evaluate

    ds, split = eval_dataset(cfg, tokenizer)
    p = next(model.parameters())
    run = replace(cfg, train=replace(cfg.train, eval_batches=max_batches))
    loss = evaluate(model, ds, run, tokenizer, p.device, _Autocast(p.device, p.dtype))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "split": split,
            "sequences": len(ds) if not max_batches else min(len(ds), max_batches * cfg.train.batch_size)}
