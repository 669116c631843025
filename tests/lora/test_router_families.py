"""MoE families whose router we do not adapt (PhiMoE's sparse mixer, Granite-MoE's router): with
``lora.target_router`` on, nothing is wrapped there and the log says so."""

from __future__ import annotations

import logging

import pytest
import torch

from qlora_trainer.config import LoRAConfig
from qlora_trainer.lora.inject import inject_lora
from qlora_trainer.lora.router import router_lora_layers
from qlora_trainer.models.families import MOE, family_config
from qlora_trainer.models.tiny import model_from_config

ROUTED = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")  # as tests/lora/test_router.py


@pytest.mark.parametrize("family", sorted(set(MOE) - set(ROUTED)))
def test_routers_we_do_not_adapt_are_said_so(family, caplog):
    model = model_from_config(family_config(family), seed=0)
    with caplog.at_level(logging.WARNING):
        inject_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, target_router=True), dtype=torch.float32,
                    backend="torch")
    assert not router_lora_layers(model)
    assert "lora.target_router: the model has no mixture-of-experts router we adapt" in caplog.text
