"""The family matrix: a tiny random model of each decoder family (``models/families.py``) trained a
few steps through our preparation (LoRA all-linear, kernel modules where they match, checkpointing)
in NF4 and dense; its adapter saved, loaded by PEFT on the 16-bit base with our logits, merged, and
run through ``generate``.

Tolerances (fp32 on the CPU): PEFT vs ours atol 1e-4 (only the summation order differs); merged vs
unmerged atol 1e-4."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.config import Config
from qlora_trainer.lora import load_adapter, save_adapter
from qlora_trainer.lora.merge import merge_lora
from qlora_trainer.lora.router import router_lora_layers
from qlora_trainer.models.families import FAMILIES, MOE, VOCAB, family_config
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import model_from_config
from qlora_trainer.train.setup import build_optimizer, prepare_model

peft = pytest.importorskip("peft")


def _base(family: str, nf4: bool) -> torch.nn.Module:
    model = model_from_config(family_config(family), seed=0)
    if nf4:
        quantize_model(model, compute_dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _config() -> Config:
    cfg = Config()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.train.lr = 2e-2
    return cfg


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_saves_loads_merges(family, nf4, tmp_path):
    _train_save_load_merge(family, nf4, tmp_path, _config())


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])  # a `gate` router
def test_moe_family_with_router_lora(family, nf4, tmp_path):
    """``lora.target_router``: the routers train too, and PEFT loads them with the rest."""
    cfg = _config()
    cfg.lora.target_router = True
    model = _train_save_load_merge(family, nf4, tmp_path, cfg)
    assert len(router_lora_layers(model)) == family_config(family).num_hidden_layers
    assert all(layer.lora_B["default"].abs().sum() > 0 for layer in router_lora_layers(model).values())  # trained


def _train_save_load_merge(family: str, nf4: bool, tmp_path, cfg: Config) -> torch.nn.Module:
    """Train 4 steps, save, load by PEFT and ours with equal logits, merge, generate; returns the
    trained model."""
    model = prepare_model(_base(family, nf4), cfg, device=torch.device("cpu"), dtype=torch.float32)
    opt = build_optimizer(model, cfg)
    ids = _batch(0)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses  # it learns (the same batch, 4 steps)
    out = save_adapter(model, tmp_path / "adapter", cfg=cfg.lora, base_model=f"random:{family}")

    probe = _batch(1)
    ours = _base(family, nf4=False)
    load_adapter(ours, out, dtype=torch.float32, backend="torch")
    expected = _logits(ours, probe)
    theirs = peft.PeftModel.from_pretrained(_base(family, nf4=False), str(out)).eval()
    with torch.no_grad():
        got = theirs(probe).logits
        with theirs.disable_adapter():
            base = theirs(probe).logits
    assert (expected - base).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    merged = merge_lora(ours, dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, probe), expected, atol=1e-4, rtol=1e-4)
    gen = merged.generate(probe[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False,
                          pad_token_id=0)
    assert gen.shape == (1, 7)
    return model
