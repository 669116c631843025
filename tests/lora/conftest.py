"""Builders shared by the adapter tests (combine, hot-swap): the tiny Llama, fp32 or NF4 (fp32
compute), in eval mode, and its logits from a no-grad forward."""

from __future__ import annotations

import pytest
import torch


def build_tiny(nf4: bool) -> torch.nn.Module:
    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.models.tiny import random_model

    model = random_model("tiny", seed=0)
    if nf4:
        model = quantize_model(model, compute_dtype=torch.float32)
    return model.eval()


def grad_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.detach()


@pytest.fixture(scope="session")
def tiny_base():
    """``tiny_base(nf4)``: a fresh tiny Llama (seed 0) in eval mode, NF4 (fp32 compute) or fp32."""
    return build_tiny


@pytest.fixture(scope="session")
def logits_of():
    """``logits_of(model, ids)``: logits of an eval-mode, no-grad forward."""
    return grad_logits


@pytest.fixture(scope="session")
def probe_ids():
    """(2, 9) token ids, seeded."""
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
