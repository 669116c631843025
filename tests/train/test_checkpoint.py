"""Checkpoints: atomic (a failed save leaves nothing behind), the adapter stored once, retention, RNG round
trip, resume errors."""

from __future__ import annotations

import random

import pytest
import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.train.checkpoint import (TrainerState, checkpoint_dirs, load_checkpoint, prune_checkpoints,
                                            resolve_resume, rng_state, save_checkpoint, set_rng_state)


class _Boom:
    def state_dict(self):
        raise RuntimeError("disk full")


def _model_and_opt(cfg):
    from qlora_trainer.models.load import load_base_model
    from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model

    cpu = torch.device("cpu")
    model = prepare_model(load_base_model(cfg, device=cpu, dtype=torch.float32), cfg, device=cpu, dtype=torch.float32)
    opt = build_optimizer(model, cfg)
    return model, opt, build_scheduler(opt, cfg)


def test_failed_save_leaves_previous_checkpoints_untouched(tiny_cfg, tmp_path):
    model, opt, sched = _model_and_opt(tiny_cfg)
    good = save_checkpoint(model, opt, sched, TrainerState(step=1), tiny_cfg)
    before = sorted(p.name for p in good.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, _Boom(), sched, TrainerState(step=2), tiny_cfg)
    root = good.parent
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # no step-2, no temp dir
    assert sorted(p.name for p in good.iterdir()) == before


@pytest.mark.parametrize("layout", ["lora only", "a trainable norm too", "old: trainable.safetensors of all"])
def test_trainable_tensors_stored_once_and_restored_exactly(tiny_cfg, layout):
    """The LoRA tensors live only in adapter/ (no trainable.safetensors); a trainable tensor the adapter
    lacks goes to trainable.safetensors alone; a checkpoint of the old layout still loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, opt, sched = _model_and_opt(tiny_cfg)
    extra = "model.norm.weight"
    if layout == "a trainable norm too":
        model.get_parameter(extra).requires_grad_(True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    path = save_checkpoint(model, opt, sched, TrainerState(step=1), tiny_cfg)
    with safe_open(str(path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len([n for n in trainable if n != extra]) > 0
    if layout == "lora only":
        assert not (path / "trainable.safetensors").exists()
    elif layout == "a trainable norm too":
        with safe_open(str(path / "trainable.safetensors"), "pt") as f:
            assert list(f.keys()) == [extra]
    else:
        save_file(trainable, str(path / "trainable.safetensors"))
    _check_restores(path, model, opt, sched, trainable)


def _check_restores(path, model, opt, sched, trainable: dict) -> None:
    """Moves every trainable tensor away, loads checkpoint ``path``: each equals ``trainable`` again."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert load_checkpoint(path, model, opt, sched).step == 1
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trainable[n]), n


@pytest.mark.parametrize("router", [False, True], ids=["experts", "experts+router"])
def test_moe_adapters_restore_exactly(tiny_cfg, router):
    """A mixture-of-experts model's adapters (per-expert LoRA, optionally the router's) come back exactly:
    the experts' tensors from trainable.safetensors, the rest from the adapter."""
    from qlora_trainer.models.families import family_config
    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.models.tiny import model_from_config
    from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model

    tiny_cfg.lora.dropout, tiny_cfg.lora.target_router = 0.0, router
    base = model_from_config(family_config("qwen3_moe"), seed=0)
    quantize_model(base, compute_dtype=torch.float32)
    model = prepare_model(base, tiny_cfg, device=torch.device("cpu"), dtype=torch.float32)
    opt = build_optimizer(model, tiny_cfg)
    sched = build_scheduler(opt, tiny_cfg)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts.lora_A." in n for n in trainable)
    assert any(".gate.lora_A." in n for n in trainable) is router
    _check_restores(save_checkpoint(model, opt, sched, TrainerState(step=1), tiny_cfg), model, opt, sched, trainable)


def test_retention_keeps_newest_by_step_number(tmp_path):
    for step in (1, 2, 9, 10, 11):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "notes").mkdir()
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-10", "step-11"]
    assert (tmp_path / "checkpoints" / "notes").is_dir()


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_resolve_resume(tiny_cfg, tmp_path):
    tiny_cfg.resume = "auto"
    assert resolve_resume(tiny_cfg) is None  # nothing yet: start fresh
    from qlora_trainer.train.resume import REQUIRED

    for step in (2, 10):  # complete checkpoints of the layout without a manifest
        (tmp_path / "run" / "checkpoints" / f"step-{step}").mkdir(parents=True)
        for name in REQUIRED:
            (tmp_path / "run" / "checkpoints" / f"step-{step}" / name).write_text("x")
    assert resolve_resume(tiny_cfg).name == "step-10"
    tiny_cfg.resume = str(tmp_path / "nowhere")
    with pytest.raises(QloraError, match="not a checkpoint directory"):
        resolve_resume(tiny_cfg)
