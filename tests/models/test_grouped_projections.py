"""Grouped q/k/v and gate/up in a model: the same training step as ungrouped, fewer base matmuls,
unchanged parameter names, and PEFT adapters load and save through grouped modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_trainer.kernels.base_weight import COUNTS


def _prepared(group: bool, dropout: float = 0.0, backend: str = "torch"):
    from qlora_trainer.config import Config
    from qlora_trainer.models.catalog import CATALOG
    from qlora_trainer.models.synthetic import synthetic_nf4_model
    from qlora_trainer.train import prepare_model

    cfg = Config()
    cfg.lora.r, cfg.lora.dropout, cfg.lora.dtype = 8, dropout, "float32"
    cfg.performance.kernels, cfg.performance.group_projections = backend, group
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    return prepare_model(synthetic_nf4_model(CATALOG["tiny"], device=cpu, compute_dtype=torch.float32), cfg,
                         device=cpu, dtype=torch.float32)


def _step(model, backend: str = "torch"):
    from qlora_trainer.train import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 260, (2, 48), generator=g)
    with torch.no_grad():  # a nonzero adapter, so every B_i and the LoRA branch of dx matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    COUNTS.clear()
    torch.manual_seed(1)
    loss, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone()}, backend=backend)
    (loss / n).backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, dict(COUNTS)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])  # triton: ~75 s
def test_grouped_step_equals_ungrouped_with_fewer_gemms(backend):
    grouped, plain = (_step(_prepared(g, backend=backend), backend) for g in (True, False))
    torch.testing.assert_close(grouped[0], plain[0], rtol=1e-6, atol=0)
    assert grouped[1].keys() == plain[1].keys() and len(plain[1]) == 56  # 28 linears x (A, B)
    for k, g in plain[1].items():
        torch.testing.assert_close(grouped[1][k], g, rtol=1e-4, atol=1e-6, msg=k)
    # per layer 7 base matmuls -> 4 (qkv, o, gate_up, down), in forward and in the recompute (down
    # skipped there); dx: 7 -> 4, layer 0's q/k/v none (its input needs no grad)
    assert plain[2]["forward"] == 4 * (7 + 6) and grouped[2]["forward"] == 4 * (4 + 3)
    assert plain[2]["dx"] == 4 * 7 - 3 and grouped[2]["dx"] == 4 * 4 - 1
    # a group's members decode in one call (nf4.dequantize_nf4_group): dequantizations follow the
    # base matmuls, 77 -> 43
    assert plain[2]["dequant"] == 4 * (7 + 6 + 7) - 3 and grouped[2]["dequant"] == 4 * (4 + 3 + 4) - 1


def test_dropout_falls_back_to_per_member_calls():
    model = _prepared(True, dropout=0.1)
    assert _step(model)[2]["forward"] == 4 * (7 + 6)


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_peft_round_trip_through_grouped_modules(tmp_path, variant):
    peft = pytest.importorskip("peft")
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora import load_adapter, save_adapter
    from qlora_trainer.models.adapt import adapt_model
    from qlora_trainer.models.catalog import get_arch
    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.models.tiny import random_model

    def base():
        arch = dataclasses.replace(get_arch("tiny"), intermediate=384)
        return quantize_model(random_model(arch, seed=0), compute_dtype=torch.float32).eval()

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                          task_type="CAUSAL_LM", use_rslora=variant == "rslora")
    theirs = peft.get_peft_model(base(), cfg).eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = base()
    load_adapter(ours, tmp_path / "p", dtype=torch.float32)
    keys = set(ours.state_dict())
    adapt_model(ours, "torch", group_projections=True)
    assert set(ours.state_dict()) == keys
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        COUNTS.clear()
        got = ours(ids).logits
        assert COUNTS["forward"] == 4 * 4  # grouped: qkv, o, gate_up, down per layer
        torch.testing.assert_close(got, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    out = save_adapter(ours, tmp_path / "ours", cfg=LoRAConfig(r=4, alpha=8, variant=variant),
                       base_model="random:tiny")
    again = peft.PeftModel.from_pretrained(base(), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
