"""Fused mixture-of-experts weights in NF4 with LoRA (models/moe.py, lora/experts.py), on tiny
Qwen3-MoE and Mixtral: the experts are 4-bit on the device, each expert's slice dequantizes exactly
as the whole tensor does, our expert loop equals transformers', the experts' adapters get gradients,
PEFT loads the saved adapter (``target_parameters``) with our logits, and merging is exact.

Tolerances (fp32): loop vs transformers 1e-5; PEFT vs ours and merged vs unmerged atol 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.config import LoRAConfig
from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4
from qlora_trainer.lora import inject_lora, load_adapter, save_adapter
from qlora_trainer.lora.experts import LoRAExperts, expert_lora_layers
from qlora_trainer.lora.merge import merge_lora
from qlora_trainer.models.families import MOE, family_config
from qlora_trainer.models.moe import EXPERT_PARAMS, NF4Experts, experts_forward, experts_modules
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import model_from_config

pytestmark = pytest.mark.parametrize("family", MOE)


def _model(family: str, nf4: bool = False) -> torch.nn.Module:
    model = model_from_config(family_config(family), seed=0)
    if nf4:
        quantize_model(model, compute_dtype=torch.float32)
    return model.eval()


def _route(seed: int = 0, tokens: int = 9, experts: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])
    return x, idx, torch.rand(tokens, 2, generator=g)


def test_experts_are_4bit_on_the_device(family):
    model = _model(family, nf4=True)
    experts = experts_modules(model)
    assert experts and all(isinstance(m, NF4Experts) for m in experts.values())
    for m in experts.values():
        stored = sum(p.numel() * p.element_size() + sum(t.numel() * t.element_size() for t in
                     (p.quant_state.absmax, p.quant_state.state2.absmax, p.quant_state.code))
                     for p in (m.gate_up_proj, m.down_proj))
        logical = sum(p.quant_state.shape.numel() for p in (m.gate_up_proj, m.down_proj))
        assert stored < 0.3 * logical * 2  # vs the 16-bit size: 4 bits + double-quantized scales
        assert stored > logical // 2  # every 4-bit code is there


def test_expert_slice_equals_the_whole_dequantization(family):
    m = next(iter(experts_modules(_model(family, nf4=True)).values()))
    for name in EXPERT_PARAMS:
        p = getattr(m, name)
        whole = dequantize_nf4(NF4Weight.from_bnb(p.data, p.quant_state), torch.float32, backend="torch")
        torch.testing.assert_close(m.dense(name, torch.float32), whole.view(m.num_experts, -1, whole.shape[1]),
                                   atol=0, rtol=0)


def test_our_loop_equals_transformers(family):
    hf = next(iter(experts_modules(_model(family)).values()))
    x, idx, w = _route()
    torch.testing.assert_close(experts_forward(hf, x, idx, w), hf(x, idx, w), atol=1e-5, rtol=1e-5)


def test_nf4_experts_equal_the_dequantized_16bit_experts(family):
    nf4 = next(iter(experts_modules(_model(family, nf4=True)).values()))
    hf = next(iter(experts_modules(_model(family)).values()))
    with torch.no_grad():
        for name in EXPERT_PARAMS:
            getattr(hf, name).copy_(nf4.dense(name, torch.float32))
    x, idx, w = _route(1)
    x.requires_grad_(True)
    ours = nf4(x, idx, w)
    (gx,) = torch.autograd.grad(ours.square().sum(), x)
    x2 = x.detach().requires_grad_(True)
    ref = hf(x2, idx, w)
    (gx2,) = torch.autograd.grad(ref.square().sum(), x2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx2, atol=1e-4, rtol=1e-4)


def _adapted(family: str, nf4: bool) -> torch.nn.Module:
    model = _model(family, nf4)
    inject_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0), dtype=torch.float32, backend="torch")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in expert_lora_layers(model).values():
            for d in layer.lora_B.values():
                for p in d.values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_experts_get_lora_gradients(family, nf4):
    model = _adapted(family, nf4)
    layers = expert_lora_layers(model)
    assert len(layers) == 2 and all(isinstance(m, LoRAExperts) for m in layers.values())
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids, labels=ids).loss.backward()
    for layer in layers.values():
        for name in EXPERT_PARAMS:
            for p in (layer.lora_A[name]["default"], layer.lora_B[name]["default"]):
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_peft_loads_expert_adapter_and_merge_is_exact(family, nf4, tmp_path):
    model = _adapted(family, nf4)
    out = save_adapter(model, tmp_path / "a", cfg=LoRAConfig(r=2, alpha=4, dropout=0.05), base_model="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # PEFT's ParamWrapper refuses dropout
    probe = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(probe).logits
    ours = _model(family)  # the 16-bit base, our loader
    load_adapter(ours, out, dtype=torch.float32, backend="torch")
    with torch.no_grad():
        dense = ours(probe).logits
    if not nf4:
        torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_model(family), str(out)).eval()
    with torch.no_grad():
        got = theirs(probe).logits
        with theirs.disable_adapter():
            base = theirs(probe).logits
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)
    merged = merge_lora(model, dtype=torch.float32)  # NF4 experts + LoRA -> 16-bit experts
    assert not expert_lora_layers(merged) and not any(isinstance(m, NF4Experts) for m in merged.modules())
    assert set(merged.state_dict()) == set(_model(family).state_dict())  # save_pretrained writes transformers' keys
    with torch.no_grad():
        torch.testing.assert_close(merged(probe).logits, expected, atol=1e-4, rtol=1e-4)


def test_delete_adapter_removes_the_experts_adapter(family):
    from qlora_trainer.lora import delete_adapter

    model = _adapted(family, nf4=True)
    delete_adapter(model, "default")
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert all(layer.active_adapter is None for layer in expert_lora_layers(model).values())


def test_dora_leaves_experts_alone(family):
    model = _model(family)
    inject_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, variant="dora"), dtype=torch.float32, backend="torch")
    assert not expert_lora_layers(model)


def test_moe_directory_loads_with_4bit_experts(family, tmp_path):
    """The user path: a saved MoE model loaded with ``model.quantization: nf4`` (bitsandbytes quantizes
    the linear layers; our loader the fused experts)."""
    from qlora_trainer.config import Config
    from qlora_trainer.models.load import load_base_model

    _model(family).save_pretrained(tmp_path)
    cfg = Config()
    cfg.model.name_or_path = str(tmp_path)
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    experts = experts_modules(model)
    assert experts and all(isinstance(m, NF4Experts) for m in experts.values())
    ids = torch.randint(3, 256, (1, 6))
    assert torch.isfinite(model(ids).logits).all()


def test_combine_and_hotswap_refuse_expert_adapters(family, tmp_path):
    from qlora_trainer.errors import QloraError
    from qlora_trainer.lora import prepare_hotswap, read_adapter
    from qlora_trainer.lora.combine import combine_adapters

    out = save_adapter(_adapted(family, False), tmp_path / "a", cfg=LoRAConfig(r=2, alpha=4, dropout=0.0),
                       base_model="tiny")
    weights = read_adapter(out)
    with pytest.raises(QloraError, match="fused MoE experts"):
        combine_adapters([weights], [1.0], "linear")
    with pytest.raises(QloraError, match="fused MoE experts"):
        prepare_hotswap(_model(family), [weights])


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.parametrize("tokens", [9, 200])  # every expert's M in the decode kernel's range / above it
def test_triton_experts_equal_the_reference(family, tokens):
    """Each expert's NF4 slice through the Triton kernels (decode GEMM or dequant + matmul) equals our
    torch reference, forward and input gradient."""
    ex = next(iter(experts_modules(_model(family, nf4=True)).values()))
    x, idx, w = _route(2, tokens)
    x.requires_grad_(True)
    outs = []
    for backend in ("torch", "triton"):
        ex.backend = backend
        y = ex(x, idx, w)
        outs.append((y, *torch.autograd.grad(y.square().sum(), x)))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
