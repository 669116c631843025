"""model.checkpoint_layers: parsing/validation, the estimate-driven plan, and partial checkpointing."""

from __future__ import annotations

import pytest

from qlora_trainer.config import Config, apply_override
from qlora_trainer.errors import ConfigError
from qlora_trainer.memory.checkpoint_plan import HEADROOM, layers_to_checkpoint, plan_checkpoint_layers


def test_config_key_parses_and_validates():
    cfg = Config()
    assert cfg.model.checkpoint_layers == "auto"
    for text, want in (("all", "all"), ("3", 3), ("0", 0), ("auto", "auto")):
        apply_override(cfg, f"model.checkpoint_layers={text}")
        assert cfg.validate().model.checkpoint_layers == want
    with pytest.raises(ConfigError, match="model.checkpoint_layers"):
        apply_override(cfg, "model.checkpoint_layers=some")
    cfg.model.checkpoint_layers = -1
    with pytest.raises(ConfigError, match="model.checkpoint_layers: must be"):
        cfg.validate()


def test_layers_to_checkpoint_interpolates_between_all_and_none():
    gb = 10**9
    # all: 10 GB, none: 42 GB over 32 layers -> 1 GB per un-checkpointed layer
    assert layers_to_checkpoint(10 * gb, 42 * gb, 32, 48 * gb / HEADROOM) == 0   # fits without
    assert layers_to_checkpoint(10 * gb, 42 * gb, 32, 9 * gb / HEADROOM) == 32   # not even with all
    assert layers_to_checkpoint(10 * gb, 42 * gb, 32, 20.5 * gb / HEADROOM) == 22  # 10 layers kept
    assert layers_to_checkpoint(10 * gb, 10 * gb, 32, 5 * gb) == 32


def test_plan_follows_the_estimate():
    cfg = Config()
    cfg.model.name_or_path, cfg.data.seq_len = "llama-2-7b", 4096
    assert plan_checkpoint_layers(cfg, None) is None  # no device budget (CPU): all, as before
    plans = [plan_checkpoint_layers(cfg, gb * 10**9) for gb in (8, 12, 24, 80)]
    assert plans[0] == 32 and plans[-1] == 0 and plans == sorted(plans, reverse=True)
    assert 0 < plans[2] < 32  # a 24 GB card at 4k tokens: some layers, not all
    cfg.model.checkpoint_layers = 5
    assert plan_checkpoint_layers(cfg, 8 * 10**9) == 5
    cfg.model.checkpoint_layers = "all"
    assert plan_checkpoint_layers(cfg, 80 * 10**9) is None
