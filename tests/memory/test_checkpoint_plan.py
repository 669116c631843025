"""performance.checkpoint_layers: parsing/validation, the estimate-driven plan, and partial checkpointing."""

from __future__ import annotations

import pytest

from qlora_trainer.config import Config, apply_override
from qlora_trainer.errors import ConfigError
from qlora_trainer.memory.checkpoint_plan import HEADROOM, fewest_layers, plan_checkpoint_layers


def test_config_key_parses_and_validates():
    cfg = Config()
    assert cfg.performance.checkpoint_layers == "auto"
    for text, want in (("all", "all"), ("3", 3), ("0", 0), ("auto", "auto")):
        apply_override(cfg, f"performance.checkpoint_layers={text}")
        assert cfg.validate().performance.checkpoint_layers == want
    with pytest.raises(ConfigError, match="performance.checkpoint_layers"):
        apply_override(cfg, "performance.checkpoint_layers=some")
    cfg.performance.checkpoint_layers = -1
    with pytest.raises(ConfigError, match="performance.checkpoint_layers: must be"):
        cfg.validate()


def test_fewest_layers_bisects_a_falling_footprint():
    gb = 10**9

    def footprint(n):  # all: 10 GB, none: 42 GB over 32 layers -> 1 GB per un-checkpointed layer
        return (10 + (32 - n)) * gb

    assert fewest_layers(footprint, 32, 48 * gb / HEADROOM) == 0      # fits without
    assert fewest_layers(footprint, 32, 9 * gb / HEADROOM) == 32      # not even with all
    assert fewest_layers(footprint, 32, 20.5 * gb / HEADROOM) == 22   # 10 layers kept
    assert fewest_layers(lambda n: 10 * gb, 32, 5 * gb) == 32
    for budget in range(10, 44):
        n = fewest_layers(footprint, 32, budget * gb / HEADROOM)
        assert footprint(n) <= budget * gb and (n == 0 or footprint(n - 1) > budget * gb)


def test_plan_follows_the_estimate():
    cfg = Config()
    cfg.model.name_or_path, cfg.data.seq_len = "llama-2-7b", 4096
    assert plan_checkpoint_layers(cfg, None) is None  # no device budget (CPU): all, as before
    plans = [plan_checkpoint_layers(cfg, gb * 10**9) for gb in (8, 12, 24, 80)]
    assert plans[0] == 32 and plans[-1] == 0 and plans == sorted(plans, reverse=True)
    assert 0 < plans[2] < 32  # a 24 GB card at 4k tokens: some layers, not all
    cfg.performance.checkpoint_layers = 5
    assert plan_checkpoint_layers(cfg, 8 * 10**9) == 5
    cfg.performance.checkpoint_layers = "all"
    assert plan_checkpoint_layers(cfg, 80 * 10**9) is None


def test_estimate_of_a_partial_plan_fits_its_budget():
    """estimate(checkpointed_layers=N): N = 0 / N = all are the two ends, each layer kept adds
    activations, and the plan's answer, estimated, fits the budget it was planned for (one fewer
    would not)."""
    from qlora_trainer.memory.estimate import estimate_for_config
    from qlora_trainer.models.catalog import get_arch

    cfg = Config()
    cfg.model.name_or_path, cfg.data.seq_len = "llama-2-7b", 4096
    layers = get_arch("llama-2-7b").layers
    every, none = estimate_for_config(cfg), estimate_for_config(cfg, checkpointed_layers=0)
    assert estimate_for_config(cfg, checkpointed_layers=layers).device_bytes == every.device_bytes
    cfg.performance.gradient_checkpointing = False
    assert estimate_for_config(cfg).device_bytes == none.device_bytes
    cfg.performance.gradient_checkpointing = True
    sizes = [estimate_for_config(cfg, checkpointed_layers=n).device_bytes for n in range(layers + 1)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    budget = 24 * 10**9
    n = plan_checkpoint_layers(cfg, budget)
    part = estimate_for_config(cfg, checkpointed_layers=n)
    assert 0 < n < layers and part.settings["checkpointed_layers"] == n
    assert sizes[n] <= HEADROOM * budget < sizes[n - 1]
