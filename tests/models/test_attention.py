"""``model.attn_implementation: auto`` picks what the model's class supports; an explicit value is
honoured; a family or an attention transformers refuses is a one-line error."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.models.attention import choose_attention
from qlora_trainer.models.tiny import model_from_config
from qlora_trainer.models.families import family_config


@pytest.mark.parametrize("family, expected", [("llama", "sdpa"), ("gemma3", "sdpa"), ("qwen3_moe", "sdpa"),
                                              ("gemma2", "eager")])
def test_auto_choice(family, expected):
    impl, reason = choose_attention(family_config(family), "auto", device="cpu", dtype=torch.float32)
    assert impl == expected and reason


def test_gemma2_builds_and_trains_with_auto():
    model = model_from_config(family_config("gemma2"))
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, 256, (1, 6))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_explicit_choice_is_kept():
    model = model_from_config(family_config("llama"), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_unknown_family_is_one_line():
    from transformers import ViTConfig

    with pytest.raises(QloraError, match="'vit'") as e:
        model_from_config(ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64))
    assert "\n" not in str(e.value)


def test_refused_attention_is_one_line():
    from transformers import Gemma2ForCausalLM

    if getattr(Gemma2ForCausalLM, "_supports_sdpa", True):
        pytest.skip("this transformers release accepts sdpa for Gemma 2")
    with pytest.raises(QloraError, match="attn_implementation") as e:
        model_from_config(family_config("gemma2"), attn_implementation="sdpa")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_gemma2_directory_loads_with_auto(tmp_path, quantization, caplog):
    """The user path: a Gemma 2 directory on disk, ``model.attn_implementation`` left at ``auto``."""
    import logging

    from qlora_trainer.config import Config
    from qlora_trainer.models.load import load_base_model

    model_from_config(family_config("gemma2")).save_pretrained(tmp_path)
    cfg = Config()
    cfg.model.name_or_path, cfg.model.quantization = str(tmp_path), quantization
    with caplog.at_level(logging.INFO, logger="qlora_trainer.models.attention"):
        model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    assert model.config._attn_implementation == "eager"
    assert "attention: eager" in caplog.text
    ids = torch.randint(0, 256, (1, 6))
    assert torch.isfinite(model(ids).logits).all()
