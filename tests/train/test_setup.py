"""prepare_model / build_optimizer / build_scheduler: only adapters train, the NF4 base never moves,
optimizer fallbacks on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from qlora_trainer.models.loss import causal_lm_loss
from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model


def _prepared(cfg):
    from qlora_trainer.models.load import load_base_model

    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    return prepare_model(model, cfg, device=torch.device("cpu"), dtype=torch.float32)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_gradients_reach_only_adapters(tiny_cfg):
    model = _prepared(tiny_cfg)
    loss, n = causal_lm_loss(model, _batch())
    (loss / n).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and trainable
    assert all(".lora_A." in f".{n}." or ".lora_B." in f".{n}." for n in trainable)
    # B starts at zero, so A's first gradient is zero; every B must get a nonzero one
    b_grads = [p.grad for name, p in model.named_parameters() if ".lora_B." in name]
    assert len(b_grads) == 28 and all(g.abs().sum() > 0 for g in b_grads)


def test_nf4_base_unchanged_by_training(tiny_cfg):
    from qlora_trainer.models.quantize import is_4bit

    model = _prepared(tiny_cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    absmax = {n: m.weight.quant_state.absmax.clone() for n, m in model.named_modules() if is_4bit(m)}
    assert len(absmax) == 28
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(model, tiny_cfg)
    for s in range(2):
        loss, n = causal_lm_loss(model, _batch(s))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(torch.equal(m.weight.quant_state.absmax, absmax[n]) for n, m in model.named_modules() if is_4bit(m))
    assert any(not torch.equal(after[n], v) for n, v in lora.items())


def test_paged_optimizer_runs_non_paged_on_cpu(tiny_cfg, caplog):
    model = _prepared(tiny_cfg)
    with caplog.at_level(logging.INFO, logger="qlora_trainer.train.setup"):
        opt = build_optimizer(model, tiny_cfg)  # default paged_adamw_8bit
    assert type(opt).__name__ == "AdamW8bit"
    assert sum("non-paged" in r.getMessage() for r in caplog.records) == 1


def test_cpu_fallback_to_torch_adamw(tiny_cfg, caplog, monkeypatch):
    import qlora_trainer.train.setup as setup

    monkeypatch.setattr(setup, "_bnb_works", lambda cls, device: False)  # a build without CPU kernels
    tiny_cfg.train.optimizer = "adamw_8bit"
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.train.setup"):
        opt = build_optimizer(_prepared(tiny_cfg), tiny_cfg)
    assert type(opt) is torch.optim.AdamW
    assert any("falling back to torch AdamW" in r.getMessage() for r in caplog.records)


def test_loraplus_groups_and_warmup_schedule(tiny_cfg):
    tiny_cfg.train.optimizer = "adamw"
    tiny_cfg.lora.loraplus_ratio = 16.0
    tiny_cfg.train.warmup_steps = 2
    opt = build_optimizer(_prepared(tiny_cfg), tiny_cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([3e-3, 3e-3 * 16])
    sched = build_scheduler(opt, tiny_cfg)
    seen = []
    for _ in range(4):
        seen.append(sched.get_last_lr()[0])  # the lora_A group
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 1.5e-3, 3e-3, 3e-3])
