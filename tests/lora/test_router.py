"""LoRA on the mixture-of-experts router (``lora.target_router``, lora/router.py) on tiny Qwen3-MoE and
Mixtral: the router is found and stays 16-bit under NF4, its adapter gets gradients through the
routing weights, PEFT loads the adapter (router + experts, ``target_parameters``) with our logits,
merging writes W + s B A under transformers' key, and disabling adapters turns it off.

Tolerances (fp32): ours vs PEFT and merged vs unmerged atol 1e-4 (summation order only)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qlora_trainer.config import Config, LoRAConfig
from qlora_trainer.errors import ConfigError
from qlora_trainer.lora import delete_adapter, disable_adapters, inject_lora, load_adapter, save_adapter
from qlora_trainer.lora.experts import expert_lora_layers
from qlora_trainer.lora.merge import merge_lora
from qlora_trainer.lora import peft_format
from qlora_trainer.lora.peft_format import PEFT_FOR_MOE
from qlora_trainer.lora.router import LoRARouter, router_lora_layers, router_modules
from qlora_trainer.models.families import family_config
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import model_from_config

ROUTED = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")  # a `gate` router we adapt
pytestmark = pytest.mark.parametrize("family", ROUTED)

CFG = LoRAConfig(r=2, alpha=4, dropout=0.0, target_router=True)


def _model(family: str, nf4: bool = False) -> torch.nn.Module:
    model = model_from_config(family_config(family), seed=0)
    if nf4:
        quantize_model(model, compute_dtype=torch.float32)
    return model.eval()


def _adapted(family: str, nf4: bool, cfg: LoRAConfig = CFG) -> torch.nn.Module:
    """Adapters on every linear layer, the experts and the routers, B random (a nonzero update)."""
    model = _model(family, nf4)
    torch.manual_seed(0)
    inject_lora(model, cfg, dtype=torch.float32, backend="torch")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _probe() -> torch.Tensor:
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_router_is_found_and_stays_16bit(family):
    model = _model(family, nf4=True)
    routers = router_modules(model)
    n_layers = family_config(family).num_hidden_layers
    assert len(routers) == n_layers and all(n.endswith(".mlp.gate") for n in routers)
    for module in routers.values():
        assert module.weight.dtype == torch.float32 and module.weight.shape == (4, 64)  # (E, H), not packed
    inject_lora(model, CFG, dtype=torch.float32, backend="torch")
    assert set(router_lora_layers(model)) == set(routers)
    assert all(isinstance(m, LoRARouter) and m.weight.dtype == torch.float32 for m in router_lora_layers(model).values())


def test_off_by_default_and_refused_with_dora(family):
    model = _model(family)
    inject_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0), dtype=torch.float32, backend="torch")
    assert not router_lora_layers(model)
    cfg = Config()
    cfg.lora.target_router, cfg.lora.variant = True, "dora"
    with pytest.raises(ConfigError, match="lora.target_router"):
        cfg.validate()


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_router_gets_lora_gradients(family, nf4):
    model = _adapted(family, nf4)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids, labels=ids).loss.backward()
    layers = router_lora_layers(model)
    assert layers
    for layer in layers.values():
        for p in (layer.lora_A["default"], layer.lora_B["default"]):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None  # the router itself is frozen


def test_router_adapter_changes_the_routing_only_through_w_prime(family):
    """Our wrapper equals the plain router with W + s B A as its weight (what PEFT's parametrization does)."""
    layer = next(iter(router_lora_layers(_adapted(family, False)).values()))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    ours = layer(x)
    plain = _model(family).get_submodule(next(iter(router_modules(_model(family)))))
    with torch.no_grad():
        plain.weight.copy_(layer.weight + layer.delta("default"))
    ref = plain(x)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with disable_adapters(layer):
        assert not torch.equal(layer(x)[0], ours[0])


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_peft_loads_router_adapter_and_merge_is_exact(family, nf4, tmp_path):
    model = _adapted(family, nf4)
    out = save_adapter(model, tmp_path / "a", cfg=CFG, base_model="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj", "mlp.gate.weight"]
    probe = _probe()
    expected = _logits(model, probe)
    with disable_adapters(model):  # experts and routers off too: the base model
        assert torch.allclose(_logits(model, probe), _logits(_model(family, nf4), probe), atol=1e-5)

    ours = _model(family)  # the 16-bit base, our loader
    load_adapter(ours, out, dtype=torch.float32, backend="torch")
    assert len(router_lora_layers(ours)) == family_config(family).num_hidden_layers
    dense = _logits(ours, probe)
    if not nf4:
        torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_model(family), str(out)).eval()
    got = _logits(theirs, probe)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)
    for layer in router_lora_layers(ours).values():  # without the router's adapter PEFT's logits differ
        layer.set_adapter(None)
    assert (got - _logits(ours, probe)).abs().max() > 1e-3

    name = next(iter(router_lora_layers(model)))
    layer = router_lora_layers(model)[name]
    want = layer.weight.detach() + layer.delta("default").detach()
    merged = merge_lora(model, dtype=torch.float32)
    assert not router_lora_layers(merged) and not expert_lora_layers(merged)
    state = merged.state_dict()
    assert set(state) == set(_model(family).state_dict())  # save_pretrained writes transformers' keys
    torch.testing.assert_close(state[f"{name}.weight"], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(merged, probe), expected, atol=1e-4, rtol=1e-4)


def test_router_alone(family, tmp_path, caplog, monkeypatch):
    """``target_experts: false``: only the routers (and linear layers) adapted; PEFT still loads it,
    and saving says from which PEFT release on."""
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, target_router=True, target_experts=False)
    model = _adapted(family, False, cfg)
    assert not expert_lora_layers(model) and router_lora_layers(model)
    monkeypatch.setattr(peft_format, "_SAID_MOE", set())  # said once per process
    with caplog.at_level(logging.INFO, logger="qlora_trainer.lora.peft_format"):
        out = save_adapter(model, tmp_path / "a", cfg=cfg, base_model="tiny")
        save_adapter(model, tmp_path / "b", cfg=cfg, base_model="tiny")
    assert caplog.text.count(f"PEFT loads it from release {PEFT_FOR_MOE} on") == 1
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"] == ["mlp.gate.weight"]
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_model(family), str(out)).eval()
    torch.testing.assert_close(_logits(theirs, _probe()), _logits(model, _probe()), atol=1e-4, rtol=1e-4)
    delete_adapter(model, "default")  # from the routers too
    assert not any("lora_" in n for n, _ in model.named_parameters())

