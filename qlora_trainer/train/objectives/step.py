"""One optimizer step's forward/backward through an objective: every micro-batch's weights are
summed over the step and the ranks first, then each micro-batch back-propagates its term sums
divided by those totals (``base.py``), so the step equals one large batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.train.objectives.base import Objective, mean_metrics


@dataclass
class StepResult:
    """The step's loss (global), averaged metrics, per-key weight totals and input tokens seen here."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    input_tokens: int = 0
    scored_tokens: float = 0.0
    """Tokens that carried a log-prob in the loss, over the step and every rank."""


def step_totals(objective: Objective, batches: list[dict[str, torch.Tensor]], par: Any) -> dict[str, float]:
    """Each weight key's count over ``batches`` and every rank (one all-reduce; same on every rank)."""
    keys: list[str] = []
    local: dict[str, float] = {}
    for b in batches:
        for k, v in objective.weights(b).items():
            if k not in local:
                keys.append(k)
            local[k] = local.get(k, 0.0) + v
    return dict(zip(keys, par.sum([local[k] for k in keys])))


def accumulate(objective: Objective, engine: torch.nn.Module, batches: list[dict[str, Any]], par: Any,
               accelerator: Any, device: torch.device, *, model: torch.nn.Module | None = None,
               step: int = 0) -> StepResult:
    """Forward + backward of ``batches`` (this rank's micro-batches of optimizer step ``step``, 0-based);
    gradients are left in the parameters for the optimizer. ``par``: the run's
    ``train.distributed.Parallel``; ``model``: the bare model (for :meth:`Objective.prepare`)."""
    if model is not None:
        batches = [objective.prepare(model, b, step=step, index=i) for i, b in enumerate(batches)]
    totals = step_totals(objective, batches, par)
    term_sums: dict[str, torch.Tensor] = {}
    metric_sums: dict[str, torch.Tensor] = {}
    tokens, scored = 0, 0.0
    for i, batch in enumerate(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with par.no_sync(engine, last=i == len(batches) - 1):
            with accelerator.autocast():
                terms, metrics = objective.outputs(engine(batch))
            scaled = sum(t * (par.world / max(totals[k], 1.0)) for k, t in terms.items())
            scaled.backward()
        for k, t in terms.items():
            term_sums[k] = term_sums.get(k, 0) + t.detach()
        for k, m in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + m.detach()
        tokens += int(batch["input_ids"].numel())
        scored += float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    t_keys, m_keys = list(term_sums), list(metric_sums)
    summed = par.sum([float(term_sums[k]) for k in t_keys] + [float(metric_sums[k]) for k in m_keys] + [scored])
    loss = sum(v / max(totals[k], 1.0) for k, v in zip(t_keys, summed))
    metrics = mean_metrics(dict(zip(m_keys, summed[len(t_keys):-1])), totals, objective.metric_weights)
    return StepResult(loss=loss, metrics=objective.finish_metrics(metrics), totals=totals, input_tokens=tokens,
                      scored_tokens=summed[-1])
