"""GRPO's loss on a rolled-out batch: group-normalised advantages, the clipped surrogate and an
optional KL to the adapter-off reference, with TRL's loss normalisations.

A batch holds N = prompts x G completions as rows ``prompt + completion`` (``labels`` score the
completion tokens only), ``advantages`` (N,), and, computed once at rollout without gradient,
``old_logps`` (N, T-1) (the sampling policy; on-policy they equal the current log-probs) and, when
``beta`` > 0, ``ref_logps`` (N, T-1). Per completion token t of row i, with r = exp(lp - lp_old):

    l_it = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta (exp(lp_ref - lp) - (lp_ref - lp) - 1)

and the loss, with m_it the completion mask and L = ``max_completion_length``:

    grpo     mean_i (sum_t m l / sum_t m)        one term per completion ("sequences")
    dr_grpo  sum_it m l / (N L)                  ("sequences", each term / L)
    bnpo, dapo  sum_it m l / sum_it m            ("tokens")

Each is divided by the count over the whole step (all micro-batches and ranks, ``base.py``): the
step equals one large batch. On a single micro-batch this is TRL's GRPOTrainer loss exactly
(TRL's bnpo/grpo/dr_grpo divide per micro-batch by the accumulation steps instead).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.errors import ConfigError
from qlora_trainer.train.objectives.base import Objective, Sums
from qlora_trainer.train.objectives.logps import token_logps
from qlora_trainer.train.objectives.rewards import finish_reward_metrics, reward_metrics

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """(N,) rewards of N = prompts x ``group`` completions (each prompt's completions consecutive) ->
    (N,) advantages ``(r - group mean) / (std + 1e-4)``; std with Bessel's correction over the group
    (``batch``: over all N; ``none``: not divided), as TRL."""
    if scale not in SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards: {scale!r} is not one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group)
    adv = rewards - grouped.mean(1).repeat_interleave(group)
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group) if group > 1 else torch.full_like(rewards, float("nan"))
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        return adv
    return torch.nan_to_num(adv / (std + 1e-4), nan=0.0)


class GRPO(Objective):
    name = "grpo"
    metric_weights: ClassVar[dict[str, str]] = {
        "kl": "tokens", "clip_ratio/low_mean": "tokens", "clip_ratio/high_mean": "tokens",
        "clip_ratio/region_mean": "tokens", "completion_length": "sequences"}

    def __init__(self, beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "dapo", max_completion_length: int = 256, rollout: Any = None) -> None:
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"grpo.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        self.beta, self.eps_low = beta, epsilon
        self.eps_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type, self.max_len = loss_type, max_completion_length
        self.rollout = rollout  # rollout.Rollout: prompt-only batches -> sampled, scored completions
        self.metric_weights = dict(GRPO.metric_weights)

    def prepare(self, model: nn.Module, batch: dict[str, Any], *, step: int, index: int) -> dict[str, Any]:
        """A prompt-only micro-batch becomes its rollout (already rolled-out batches pass through)."""
        if "prompt_text" not in batch:
            return batch
        out = self.rollout(model, batch, step=step, index=index)
        for k in reward_metrics(out):
            self.metric_weights[k] = "sequences"
        return out

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return finish_reward_metrics(metrics)

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"sequences": float(batch["input_ids"].shape[0]),
                "tokens": float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:
        logps, mask = token_logps(model, {k: batch[k] for k in ("input_ids", "labels", "attention_mask")
                                          if k in batch}, chunk_size=chunk_size)
        terms, metrics = self.terms(logps, mask, batch)
        return terms, {**metrics, **reward_metrics(batch)}

    def terms(self, logps: torch.Tensor, mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[Sums, Sums]:
        """The loss terms and metrics from per-token log-probs ``logps`` (N, T-1) and ``mask``."""
        m = mask.float()
        adv = batch["advantages"].float()[:, None]
        old = batch.get("old_logps")
        coef = torch.exp(logps - (logps.detach() if old is None else old))
        clipped = torch.clamp(coef, 1 - self.eps_low, 1 + self.eps_high)
        per_token = -torch.min(coef * adv, clipped * adv)
        metrics: Sums = {}
        if self.beta != 0.0:
            d = batch["ref_logps"] - logps
            kl = torch.exp(d) - d - 1
            per_token = per_token + self.beta * kl
            metrics["kl"] = (kl.detach() * m).sum()
        summed = (per_token * m).sum(-1)
        if self.loss_type == "grpo":
            terms = {"sequences": (summed / m.sum(-1).clamp(min=1.0)).sum()}
        elif self.loss_type == "dr_grpo":
            terms = {"sequences": summed.sum() / self.max_len}
        else:
            terms = {"tokens": summed.sum()}
        low = (coef < 1 - self.eps_low) & (adv < 0)
        high = (coef > 1 + self.eps_high) & (adv > 0)
        metrics.update({"clip_ratio/low_mean": (low.float() * m).sum().detach(),
                        "clip_ratio/high_mean": (high.float() * m).sum().detach(),
                        "clip_ratio/region_mean": ((low | high).float() * m).sum().detach(),
                        "completion_length": m.sum().detach()})
        return terms, metrics
