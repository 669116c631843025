"""Experts in a layout we do not run (GPT-OSS: transposed (E, H, 2I), with biases) are said so at
quantization, not silently left 16-bit and unadapted."""

from __future__ import annotations

import logging

import pytest
import torch

from qlora_trainer.models.families import _COMMON
from qlora_trainer.models.moe import NF4Experts, other_experts_modules
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import model_from_config

transformers = pytest.importorskip("transformers")


def test_gpt_oss_experts_are_named_and_kept_16_bit(caplog):
    cfg = transformers.GptOssConfig(**{**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                      "head_dim": 16, "sliding_window": 16})
    model = model_from_config(cfg, seed=0)
    assert len(other_experts_modules(model)) == 2  # one per layer
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.models.moe"):
        quantize_model(model, compute_dtype=torch.float32)
    assert "2 experts modules (GptOssExperts) are in a layout we do not run" in caplog.text
    assert not any(isinstance(m, NF4Experts) for m in model.modules())
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
