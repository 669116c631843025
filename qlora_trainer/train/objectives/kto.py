"""KTO on unpaired data (``prompt``/``completion``/``label``), reference = the adapter-off base.

With completion log-ratio ``l_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)`` and the KL baseline

    z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])     (no gradient)

over mismatched pairs (prompt i with the completion of row i-1 of the micro-batch, as TRL builds
them):

    desirable:    loss_i = w_d (1 - sig(beta (l_i - z0)))
    undesirable:  loss_i = w_u (1 - sig(beta (z0 - l_i)))
    loss = mean over the step's examples;   rewards: beta l_i

As in TRL the baseline is estimated per micro-batch (on each rank), so KTO alone is not exactly
one large batch under accumulation; everything else is.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from qlora_trainer.train.objectives.base import Objective, Sums
from qlora_trainer.train.objectives.logps import reference_token_logps, sequence_sums, token_logps


def kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mismatched-pair rows of an unpaired batch (``kl_*`` keys without the prefix)."""
    return {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}


class KTO(Objective):
    name = "kto"
    needs_reference = True
    metric_weights: ClassVar[dict[str, str]] = {
        "rewards/chosen": "chosen", "logps/chosen": "chosen", "rewards/rejected": "rejected",
        "logps/rejected": "rejected", "kl": "micro_batches"}

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        n_chosen = float(batch["label"].sum())
        return {"examples": float(batch["label"].shape[0]), "chosen": n_chosen,
                "rejected": batch["label"].shape[0] - n_chosen, "micro_batches": 1.0}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:
        kl = kl_batch(batch)
        with torch.no_grad():
            kl_policy, kl_mask = token_logps(model, kl, chunk_size=chunk_size)
        kl_ref = reference_token_logps(model, kl, chunk_size=chunk_size)
        z0 = (((kl_policy - kl_ref) * kl_mask).sum(-1)).mean().clamp(min=0)
        main = {k: v for k, v in batch.items() if k not in ("label",) and not k.startswith("kl_")}
        logps, mask = token_logps(model, main, chunk_size=chunk_size)
        seq, _ = sequence_sums(logps, mask)
        ref, _ = sequence_sums(reference_token_logps(model, main, chunk_size=chunk_size), mask)
        ratio = seq - ref
        good = batch["label"].bool()
        losses = torch.where(good, self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - z0))),
                             self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - ratio))))
        rewards = self.beta * ratio.detach()
        metrics = {"rewards/chosen": rewards[good].sum(), "rewards/rejected": rewards[~good].sum(),
                   "logps/chosen": seq.detach()[good].sum(), "logps/rejected": seq.detach()[~good].sum(),
                   "kl": z0.detach()}
        return {"examples": losses.sum()}, metrics

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics
