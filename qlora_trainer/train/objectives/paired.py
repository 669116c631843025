"""Paired preference objectives: DPO (sigmoid, label smoothing), IPO, ORPO, SimPO.

A batch holds B pairs as 2B rows ``[chosen_1..B; rejected_1..B]`` (``data/preference.py``);
``labels`` score the completion tokens only. One forward runs both sides. With per-sequence
completion log-probs ``c, r`` (summed) and the adapter-off reference's ``c0, r0``:

    DPO     d = (c - c0) - (r - r0)
            loss_i = -(1-eps) log sig(beta d) - eps log sig(-beta d)         rewards: beta (c - c0), beta (r - r0)
    IPO     d = (c - c0)/|c| - (r - r0)/|r|   (token-normalised, as TRL)
            loss_i = (d - 1/(2 beta))^2
    SimPO   c~, r~ = length-averaged log-probs;  z = c~ - r~ - gamma/beta
            loss_i = -(1-eps) log sig(beta z) - eps log sig(-beta z)  [+ alpha * chosen completion NLL]
            rewards: beta c~, beta r~
    ORPO    log_odds = (c~ - r~) - (log(1 - e^c~) - log(1 - e^r~))
            loss = NLL(chosen, every non-pad token, token mean) - beta * mean_i log sig(log_odds_i)
            rewards: beta c~, beta r~

Definitions follow TRL (DPOTrainer, CPOTrainer ``simpo``, ORPOTrainer) so losses and metrics match
it on the same batch; the tests hold us to it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.train.objectives.base import Objective, Sums
from qlora_trainer.train.objectives.logps import reference_token_logps, sequence_sums, token_logps

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> Sums:
    """Sums over the pairs of TRL's reward metrics (each (B,) in, () detached out)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/margins": (c - r).sum(),
            "rewards/accuracies": (c > r).float().sum(), "logps/chosen": chosen_logps.detach().sum(),
            "logps/rejected": rejected_logps.detach().sum()}


def sigmoid_loss(z: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-(1-eps) log sig(beta z) - eps log sig(-beta z), per pair."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _Paired(Objective):
    paired = True
    metric_weights: ClassVar[dict[str, str]] = {m: "pairs" for m in PAIR_METRICS}

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        self.beta, self.label_smoothing = beta, label_smoothing

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"pairs": float(batch["input_ids"].shape[0] // 2)}


class DPO(_Paired):
    """DPO with the sigmoid loss (``label_smoothing`` > 0: conservative DPO); reference = adapter off."""

    name = "dpo"
    needs_reference = True

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:
        logps, mask = token_logps(model, batch, chunk_size=chunk_size)
        seq, n = sequence_sums(logps, mask)
        ref, _ = sequence_sums(reference_token_logps(model, batch, chunk_size=chunk_size), mask)
        c, r = seq.chunk(2)
        chosen_lr, rejected_lr = c - ref.chunk(2)[0], r - ref.chunk(2)[1]
        per_pair = self.per_pair(chosen_lr, rejected_lr, n)
        metrics = pair_metrics(self.beta * chosen_lr, self.beta * rejected_lr, c, r)
        return {"pairs": per_pair.sum()}, metrics

    def per_pair(self, chosen_lr: torch.Tensor, rejected_lr: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(chosen_lr - rejected_lr, self.beta, self.label_smoothing)


class IPO(DPO):
    """IPO: squared loss on the token-normalised log-ratio difference."""

    name = "ipo"

    def per_pair(self, chosen_lr: torch.Tensor, rejected_lr: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        nc, nr = n.clamp(min=1.0).chunk(2)
        return (chosen_lr / nc - rejected_lr / nr - 1 / (2 * self.beta)) ** 2


class SimPO(_Paired):
    """SimPO (reference-free): length-averaged log-probs with a target margin ``gamma``; optional
    chosen-completion NLL weighted ``alpha`` (CPO-SimPO)."""

    name = "simpo"
    metric_weights = {**_Paired.metric_weights, "nll_loss": "chosen_tokens"}

    def __init__(self, beta: float = 2.0, label_smoothing: float = 0.0, gamma: float = 0.5,
                 alpha: float = 0.0) -> None:
        super().__init__(beta, label_smoothing)
        self.gamma, self.alpha = gamma, alpha

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        chosen = batch["labels"].chunk(2)[0][:, 1:]
        return {**super().weights(batch), "chosen_tokens": float((chosen != IGNORE_INDEX).sum())}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:
        logps, mask = token_logps(model, batch, chunk_size=chunk_size)
        seq, n = sequence_sums(logps, mask)
        avg = seq / n.clamp(min=1.0)
        c, r = avg.chunk(2)
        per_pair = sigmoid_loss(c - r - self.gamma / self.beta, self.beta, self.label_smoothing)
        nll_sum = -seq.chunk(2)[0].sum()
        terms = {"pairs": per_pair.sum(), "chosen_tokens": self.alpha * nll_sum}
        metrics = {**pair_metrics(self.beta * c, self.beta * r, c, r), "nll_loss": nll_sum.detach()}
        return terms, metrics


class ORPO(_Paired):
    """ORPO (reference-free): chosen NLL plus the log odds-ratio term."""

    name = "orpo"
    metric_weights = {**_Paired.metric_weights, "nll_loss": "chosen_tokens", "log_odds_ratio": "pairs",
                      "log_odds_chosen": "pairs"}

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        chosen = batch["attention_mask"].chunk(2)[0][:, 1:] if "attention_mask" in batch else \
            torch.ones_like(batch["input_ids"].chunk(2)[0][:, 1:])
        return {**super().weights(batch), "chosen_tokens": float(chosen.sum())}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:
        completion = batch["labels"][:, 1:] != IGNORE_INDEX
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        every = {**batch, "labels": batch["input_ids"].masked_fill(real == 0, IGNORE_INDEX)}
        logps, all_mask = token_logps(model, every, chunk_size=chunk_size)  # prompt + completion tokens
        seq, n = sequence_sums(logps, completion)
        avg = seq / n.clamp(min=1.0)
        c, r = avg.chunk(2)
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        nll_sum = -(logps * all_mask).chunk(2)[0].sum()
        terms = {"chosen_tokens": nll_sum, "pairs": -self.beta * ratio.sum()}
        metrics = {**pair_metrics(self.beta * c, self.beta * r, c, r), "nll_loss": nll_sum.detach(),
                   "log_odds_ratio": ratio.detach().sum(), "log_odds_chosen": log_odds.detach().sum()}
        return terms, metrics
