"""Training objectives as loss objects (``train.objective``): SFT, DPO, IPO, KTO, ORPO, SimPO.

``build_objective(cfg)`` -> an :class:`Objective`; ``step.accumulate`` runs one optimizer step's
micro-batches through it (exact under accumulation and data parallel, see ``base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_trainer.train.objectives.base import Objective, mean_metrics
from qlora_trainer.train.objectives.kto import KTO
from qlora_trainer.train.objectives.paired import DPO, IPO, ORPO, SimPO
from qlora_trainer.train.objectives.sft import SFT

if TYPE_CHECKING:
    from qlora_trainer.config import Config

OBJECTIVES = {o.name: o for o in (SFT, DPO, IPO, KTO, ORPO, SimPO)}


def build_objective(cfg: "Config") -> Objective:
    """The configured objective with its ``preference`` settings."""
    p = cfg.preference
    name = cfg.train.objective
    if name in ("dpo", "ipo"):
        return OBJECTIVES[name](beta=p.beta, label_smoothing=p.label_smoothing)
    if name == "orpo":
        return ORPO(beta=p.beta)
    if name == "simpo":
        return SimPO(beta=p.beta, label_smoothing=p.label_smoothing, gamma=p.simpo_gamma, alpha=p.simpo_nll_weight)
    if name == "kto":
        return KTO(beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
    return SFT()


__all__ = ["DPO", "IPO", "KTO", "OBJECTIVES", "ORPO", "SFT", "Objective", "SimPO", "build_objective",
           "mean_metrics"]
