"""What a training objective does to a step's memory, on top of ``estimate.py``'s SFT step.

* Paired objectives (DPO, IPO, ORPO, SimPO) run chosen and rejected in one forward: the step's
  activations are those of ``2 x train.batch_size`` sequences of up to ``data.seq_len`` tokens. The
  reference forward of DPO/IPO runs under ``no_grad`` after the policy forward: it saves nothing,
  and its per-layer workspace is below the policy backward's.
* KTO: B sequences with gradient plus B mismatched (KL) sequences without: B for the activations.
* GRPO: ``B x grpo.num_generations`` sequences of prompt (<= ``data.seq_len``) + completion
  (``grpo.max_completion_length``) tokens; before them, the rollout's KV cache and generation
  workspace for the same rows (a separate moment: the rollout ends before the forward starts).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from qlora_trainer.memory.estimate import MemoryEstimate, estimate_for_config, resolve_arch
from qlora_trainer.memory.inference import generation_memory

if TYPE_CHECKING:
    from qlora_trainer.config import Config

PAIRED = ("dpo", "ipo", "orpo", "simpo")


def step_shape(cfg: "Config") -> tuple[int, int]:
    """(sequences per micro-batch, tokens per sequence) the objective's training forward runs."""
    b, t, obj = cfg.train.batch_size, cfg.data.seq_len, cfg.train.objective
    if obj in PAIRED:
        return 2 * b, t
    if obj == "grpo":
        return b * cfg.grpo.num_generations, t + cfg.grpo.max_completion_length
    return b, t


def estimate_for_objective(cfg: "Config", checkpointed_layers: int | None = None) -> MemoryEstimate | None:
    """``estimate_for_config`` with the objective's step shape; GRPO adds its rollout moment
    (``phases["generation"]``: KV cache + workspace) and, where that moment is the larger one, the
    difference as ``components["generation_extra"]``."""
    shaped = copy.deepcopy(cfg)
    shaped.train.batch_size, shaped.data.seq_len = step_shape(cfg)
    est = estimate_for_config(shaped, checkpointed_layers)
    if est is None:
        return None
    est.settings["objective"] = cfg.train.objective
    if cfg.train.objective in PAIRED:
        est.notes.append(f"{cfg.train.objective}: chosen and rejected in one forward "
                         f"({2 * cfg.train.batch_size} sequences per micro-batch)")
    if cfg.train.objective != "grpo":
        return est
    arch, _ = resolve_arch(cfg.model.name_or_path)
    rows = cfg.train.batch_size * cfg.grpo.num_generations
    act = est.settings.get("act_bytes", 2)
    gen = generation_memory(arch, batch=rows, prompt_len=cfg.data.seq_len,
                            new_tokens=cfg.grpo.max_completion_length, act_bytes=act, include_weights=False)
    moment = gen.kv_cache + gen.transient
    train_peak = max((sum(p.values()) for p in est.phases.values()), default=0)
    est.phases["generation"] = {"kv_cache": gen.kv_cache, "generation_workspace": gen.transient}
    if moment > train_peak:
        est.components["generation_extra"] = moment - train_peak
    est.notes.append(f"grpo: {rows} rollouts per micro-batch; KV cache {gen.kv_cache / 1e9:.2f} GB + "
                     f"workspace {gen.transient / 1e9:.2f} GB while generating")
    return est
