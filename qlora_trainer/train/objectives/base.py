"""The objective interface: what one optimizer step needs from a training objective.

A step is ``grad_accum`` micro-batches on each of ``world`` ranks. An objective's loss is a sum of
terms, each a sum over items (tokens, pairs, examples) divided by that item's count over the WHOLE
step (all micro-batches, all ranks):

    loss = sum_k  (sum over the step's items of term_k) / N_k

:meth:`Objective.weights` gives a micro-batch's item counts ``n_k`` from the batch alone (before any
forward), so the step knows every ``N_k = sum n_k`` before the first backward and each micro-batch
back-propagates ``sum_k term_k_sum * world / N_k`` (DDP averages gradients over ranks, hence
``world``). The gradients are then exactly those of one large batch, whatever the padding, the
accumulation or the number of ranks (SFT's token mean is the one-term case ``tokens``).

Metrics are sums too, each divided by the step total of the count named in ``metric_weights``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

Sums = dict[str, torch.Tensor]


class Objective:
    """Base class. Subclasses set ``name`` and implement :meth:`weights` and :meth:`loss`."""

    name: ClassVar[str] = ""
    paired: ClassVar[bool] = False
    """Batches hold ``[chosen; rejected]`` rows (2B sequences for B pairs)."""
    needs_reference: ClassVar[bool] = False
    """The loss runs the adapter-off reference forward too (no_grad)."""
    metric_weights: ClassVar[dict[str, str]] = {}
    """Metric name -> the weight key it is averaged over."""

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Item counts of this micro-batch, one per loss term / metric denominator."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
             backend: str = "auto") -> tuple[Sums, Sums]:
        """(term sums keyed like :meth:`weights`: () fp32 differentiable; metric sums: () detached)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, batch: dict[str, Any], *, step: int, index: int) -> dict[str, Any]:
        """A micro-batch as the data pipeline gave it -> the tensors :meth:`weights` and :meth:`loss`
        read (GRPO samples and scores completions here); runs before the step's totals."""
        return batch

    def outputs(self, out: Any) -> tuple[Sums, Sums]:
        """The engine's output -> (term sums, metric sums); the engine runs :meth:`loss` as is."""
        return out

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived metrics from the step's averaged ones (e.g. a margin of two means)."""
        return metrics


def mean_metrics(sums: dict[str, float], totals: dict[str, float], weights: dict[str, str]) -> dict[str, float]:
    """Metric sums -> means over their weight's step total (a metric whose total is 0 is left out)."""
    return {k: v / totals[weights[k]] for k, v in sums.items() if totals.get(weights[k], 0) > 0}
