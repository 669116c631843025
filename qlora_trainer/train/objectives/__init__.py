"""Training objectives as loss objects (``train.objective``): SFT, DPO, IPO, KTO, ORPO, SimPO, GRPO.

``build_objective(cfg)`` -> an :class:`Objective`; ``step.accumulate`` runs one optimizer step's
micro-batches through it (exact under accumulation and data parallel, see ``base.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_trainer.train.objectives.base import Objective, mean_metrics
from qlora_trainer.train.objectives.grpo import GRPO
from qlora_trainer.train.objectives.kto import KTO
from qlora_trainer.train.objectives.paired import DPO, IPO, ORPO, SimPO
from qlora_trainer.train.objectives.rewards import load_reward, reward_name
from qlora_trainer.train.objectives.rollout import Rollout
from qlora_trainer.train.objectives.sft import SFT

if TYPE_CHECKING:
    from qlora_trainer.config import Config

OBJECTIVES = {o.name: o for o in (SFT, DPO, IPO, KTO, ORPO, SimPO, GRPO)}


def build_objective(cfg: "Config", tokenizer: Any = None) -> Objective:
    """The configured objective with its ``preference`` / ``grpo`` settings (GRPO samples with
    ``tokenizer``)."""
    p = cfg.preference
    name = cfg.train.objective
    if name == "grpo":
        return _grpo(cfg, tokenizer)
    if name in ("dpo", "ipo"):
        return OBJECTIVES[name](beta=p.beta, label_smoothing=p.label_smoothing)
    if name == "orpo":
        return ORPO(beta=p.beta)
    if name == "simpo":
        return SimPO(beta=p.beta, label_smoothing=p.label_smoothing, gamma=p.simpo_gamma, alpha=p.simpo_nll_weight)
    if name == "kto":
        return KTO(beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
    return SFT()


def _grpo(cfg: "Config", tokenizer: Any) -> GRPO:
    g = cfg.grpo
    names = list(g.rewards or [])
    rollout = Rollout(tokenizer=tokenizer, reward_fns=[load_reward(n) for n in names], reward_names=[reward_name(n) for n in names],
                      reward_weights=list(g.reward_weights or [1.0] * len(names)), group=g.num_generations,
                      max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                      seed=cfg.train.seed, scale_rewards=g.scale_rewards, beta=g.beta,
                      chunk_size=cfg.performance.loss_chunk_size)
    return GRPO(beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high, loss_type=g.loss_type,
                max_completion_length=g.max_completion_length, rollout=rollout)


__all__ = ["DPO", "GRPO", "IPO", "KTO", "OBJECTIVES", "ORPO", "SFT", "Objective", "SimPO", "build_objective",
           "mean_metrics"]
