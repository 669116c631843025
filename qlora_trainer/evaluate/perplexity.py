"""Mean loss and perplexity on a dataset, through the training data pipeline and loss masks.

The records go through ``data.build_datasets`` with the run's ``data`` section (same rendering,
template, truncation and completion-only labels as training), the batches through
``data.make_dataloader`` and the loss through :func:`mean_loss` (``causal_lm_loss``: the token mean
over loss-carrying tokens, dropout off, RNG untouched), the loop the trainer's eval runs too.
``perplexity = exp(mean loss)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from qlora_trainer.data import build_datasets, make_dataloader
from qlora_trainer.models.loss import causal_lm_loss

if TYPE_CHECKING:
    from qlora_trainer.config import Config


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The training autocast outside a run: bf16 on CUDA for a bf16 model, else none."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, eval_ds: Any, cfg: "Config", tokenizer: Any, device: torch.device, *,
              autocast: Callable[[], contextlib.AbstractContextManager], max_batches: int = 0,
              loss: Callable[[dict], tuple[torch.Tensor, int]] | None = None) -> float:
    """Token-mean loss over ``max_batches`` batches of ``eval_ds`` (all when 0), dropout off.
    Leaves the global RNG untouched, so evaluating does not change a training run. ``autocast``: the
    context each batch runs under (the recipe's ``accelerator.autocast``); ``loss``: micro-batch ->
    (summed loss, loss tokens), e.g. the distributed engine; default ``causal_lm_loss`` on ``model``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        dl = make_dataloader(eval_ds, cfg=cfg.data, tokenizer=tokenizer, batch_size=cfg.train.batch_size,
                             shuffle=False, seed=cfg.train.seed)
        for i, batch in enumerate(dl):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss_sum, n = loss(batch) if loss is not None else causal_lm_loss(
                    model, batch, chunk_size=cfg.performance.loss_chunk_size, backend=cfg.performance.kernels)
            total, count = total + float(loss_sum), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def eval_dataset(cfg: "Config", tokenizer: Any) -> tuple[Any, str]:
    """The run's eval split (``data.eval_path`` / ``data.eval_fraction``), else its training data;
    returns (dataset, which: ``eval`` | ``train``)."""
    train, ev = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    return (ev, "eval") if ev is not None and len(ev) else (train, "train")


def dataset_loss(model: torch.nn.Module, cfg: "Config", tokenizer: Any, *, max_batches: int = 0) -> dict:
    """``{"loss", "perplexity", "split", "batches"}`` of ``model`` on the run's eval data
    (``max_batches`` batches of ``train.batch_size``; 0 = all)."""
    ds, split = eval_dataset(cfg, tokenizer)
    p = next(model.parameters())
    loss = mean_loss(model, ds, cfg, tokenizer, p.device, autocast=lambda: autocast_for(p.device, p.dtype),
                     max_batches=max_batches)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "split": split,
            "sequences": len(ds) if not max_batches else min(len(ds), max_batches * cfg.train.batch_size)}
