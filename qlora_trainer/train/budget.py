"""How long a run is, and whether a finished run has anything left to do.

A run is sized by ``train.max_steps`` (optimizer steps) or ``train.epochs`` (passes over the training
data, the HF Trainer's ``num_train_epochs``; fractions allowed), never both. :func:`resolve_budget`
turns epochs into steps once the data is tokenized: ``ceil(epochs * batches_per_epoch / grad_accum)``
(micro-batches of this rank's shard; a step may straddle two epochs, as the data stream is continuous).
The LR schedule (warm-up, cosine/linear decay) and the progress bar then run over that many steps.

:func:`already_complete` decides ``resume=auto`` on a finished run: a larger budget continues from the
newest checkpoint (the resume checks apply as to any resume: only the budget may change); a budget
the checkpoint has reached already leaves nothing to do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any
from qlora_trainer.data import make_dataloader
from qlora_trainer.io import FIX_CHECKPOINT, read_json_object

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)

DEFAULT_STEPS = 100  # train.max_steps when neither it nor train.epochs is set


def resolve_budget(cfg: "Config", train_ds: Any, tokenizer: Any, *, rank: int = 0, world: int = 1) -> "Config":
    """``cfg`` with ``train.max_steps`` the run's step budget and ``train.epochs`` unset (a copy when
    anything changes; the copy is what checkpoints and the adapter record)."""
    t = cfg.train
    if t.epochs is None:
        if t.max_steps is not None:
            return cfg
        steps = DEFAULT_STEPS
    else:

        batches = len(make_dataloader(train_ds, cfg=cfg.data, tokenizer=tokenizer, batch_size=t.batch_size,
                                      shuffle=True, seed=t.seed, epoch=0, rank=rank, world=world))
        steps = max(1, math.ceil(t.epochs * batches / t.grad_accum))
        log.info("train.epochs=%g: %d micro-batches per epoch, %d per step -> %d optimizer steps",
                 t.epochs, batches, t.grad_accum, steps)
    # validated again: the rules that involve the budget (AdaLoRA's phases) now see it
    return dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps, epochs=None)).validate()


def budget_label(cfg: "Config", epochs: float | None) -> str:
    """The progress bar's description: the budget in the unit the user gave it."""
    if epochs is None:
        return "train"
    return f"train ({epochs:g} epoch{'s' if epochs != 1 else ''} = {cfg.train.max_steps} steps)"


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved after (its ``trainer_state.json``)."""

    return int(read_json_object(checkpoint / "trainer_state.json", fix=FIX_CHECKPOINT).get("step", 0))


def already_complete(cfg: "Config", out: Path, resume: Path | None) -> bool:
    """True when ``out`` holds a finished adapter and its newest checkpoint ``resume`` has reached the
    budget: nothing to do (logged). With a larger budget the run continues from ``resume``."""
    if resume is None or not (out / "adapter" / "adapter_config.json").is_file():
        return False
    step = checkpoint_step(resume)
    if step < cfg.train.max_steps:
        log.info("continuing the finished run in %s from step %d to step %d", out, step, cfg.train.max_steps)
        return False
    log.warning("the run in %s is already complete (step %d of train.max_steps %d); nothing to do: raise "
                "train.max_steps or train.epochs to continue it", out, step, cfg.train.max_steps)
    return True


def finished_adapter_error(out: Path) -> str:
    """The refusal to train from scratch over a finished run."""
    return (f"output_dir: {str(out)!r} already holds a finished adapter; set resume=auto (with a larger "
            f"train.max_steps or train.epochs) to continue it, output.overwrite=true to start over, or pick "
            f"another output_dir")

