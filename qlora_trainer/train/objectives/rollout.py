"""GRPO rollouts: G sampled completions per prompt from our KV-cached batched generation, scored by
the reward functions, turned into a training micro-batch with group-normalised advantages.

Sampling is seeded by (``train.seed``, optimizer step, micro-batch index) inside ``fork_rng``
(``evaluate/generation.py``), so a resumed run samples what the uninterrupted one did. Each row is
``prompt tokens + completion tokens`` (the prompt tokenized exactly as generation tokenized it),
right-padded, ``labels`` on the completion only. With ``beta`` > 0 the reference log-probs (adapter
off) are computed here once, without gradient. On-policy (one update per rollout, TRL's default)
the old log-probs equal the current ones, so the ratio is 1 in value and only its gradient counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.data.preference import pad_rows
from qlora_trainer.evaluate.generation import GenerationSettings, generate_batch
from qlora_trainer.train.objectives.grpo import group_advantages
from qlora_trainer.train.objectives.logps import reference_token_logps
from qlora_trainer.train.objectives.rewards import RewardFn, score


@dataclass
class Rollout:
    tokenizer: Any
    reward_fns: list[RewardFn]
    reward_names: list[str]
    reward_weights: list[float]
    group: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    scale_rewards: str = "group"
    beta: float = 0.0
    chunk_size: int = 0

    def __call__(self, model: nn.Module, batch: dict[str, list], *, step: int, index: int) -> dict[str, torch.Tensor]:
        """Prompt-only micro-batch (``prompt_text`` + extra columns, lists of B) -> (B*G)-row batch:
        ``input_ids``/``labels``/``attention_mask`` (B*G, T), ``advantages`` (B*G,), reward columns."""
        prompts = [p for p in batch["prompt_text"] for _ in range(self.group)]
        columns = {k: [v for v in vals for _ in range(self.group)] for k, vals in batch.items() if k != "prompt_text"}
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, sample=True, temperature=self.temperature,
                                      top_p=self.top_p, seed=self.seed * 1_000_003 + step * 1009 + index,
                                      batch_size=len(prompts))
        completions = generate_batch(model, self.tokenizer, prompts, settings)
        total, per_fn = score(self.reward_fns, self.reward_weights, prompts, [c.text for c in completions], columns)
        rewards = torch.tensor(total, dtype=torch.float32)
        out = self._rows(prompts, [c.ids for c in completions])
        out["advantages"] = group_advantages(rewards, self.group, self.scale_rewards)
        out["reward"] = rewards
        for name, rs in zip(self.reward_names, per_fn):
            out[f"reward/{name}"] = torch.tensor(rs, dtype=torch.float32)
        if self.beta != 0.0:
            device = next(model.parameters()).device
            moved = {k: out[k].to(device) for k in ("input_ids", "labels", "attention_mask")}
            out["ref_logps"] = reference_token_logps(model, moved, chunk_size=self.chunk_size).cpu()
        return out

    def _rows(self, prompts: list[str], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for p, c in zip(prompts, completions):
            ids = self.tokenizer(p)["input_ids"]
            seqs.append(ids + c)
            labels.append([IGNORE_INDEX] * len(ids) + c)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return pad_rows(seqs, labels, pad)
