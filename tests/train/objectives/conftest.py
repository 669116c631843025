"""Fixtures for the objective tests: the tiny NF4 Llama with a LoRA adapter whose B is random (so
the policy differs from the adapter-off reference), dropout off, and a fixed preference batch."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def adapted_model():
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora import inject_lora
    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.models.tiny import random_model

    torch.manual_seed(0)
    model = quantize_model(random_model("tiny", seed=0), compute_dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0), dtype=torch.float32, backend="torch")
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model.train()


@pytest.fixture
def pair_batch() -> dict[str, torch.Tensor]:
    return make_pair_batch()


def make_pair_batch(n_pairs: int = 3, seed: int = 2) -> dict[str, torch.Tensor]:
    """(2B, T) rows [chosen; rejected] of random tokens: prompts of 3..5 tokens, completions of 2..7,
    right padding, labels -100 on prompt and padding (vocab 260)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    prompts = [torch.randint(3, 260, (int(torch.randint(3, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_pairs)]
    for side in range(2):
        for p in prompts:
            c = torch.randint(3, 260, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    lab = torch.full((len(rows), T), -100)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(r)], att[i, :len(r)] = torch.tensor(r), torch.tensor(y), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}
