"""Supervised fine-tuning: the token-mean causal-LM loss (``train/loss.py``) as an objective."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.train.objectives.base import Objective, Sums
from qlora_trainer.models.loss import causal_lm_loss


class SFT(Objective):
    """loss = sum of next-token cross-entropies / the step's scored-token count."""

    name = "sft"

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"tokens": float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:

        return self.outputs(causal_lm_loss(model, batch, chunk_size=chunk_size, backend=backend))

    def outputs(self, out: Any) -> tuple[Sums, Sums]:
        """``causal_lm_loss``'s ``(loss_sum, n_tokens)`` (the engine SFT runs) -> term sums."""
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
            return {"tokens": out[0]}, {}
        return out
