"""LoRALinear and inject_lora: identity at init, frozen base, each variant's forward against the dense
formula (fp32 and NF4 bases), DoRA gradients against autograd on the dense formula, LoRA+ groups.

Tolerances (fp32): outputs atol 1e-5, gradients atol 1e-5 (different summation order only).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlora_trainer.config import load_config, LoRAConfig
from qlora_trainer.errors import ConfigError
from qlora_trainer.lora import (AdapterSpec, LoRALinear, inject_lora, lora_layers, lora_param_groups,
                                trainable_parameters)
from qlora_trainer.lora.layer import dequantized_weight
from qlora_trainer.models.quantize import quantize_linear

IN, OUT, R = 40, 24, 4  # odd-ish shapes on purpose


def _base(nf4: bool, bias: bool = True) -> nn.Module:
    lin = nn.Linear(IN, OUT, bias=bias)
    return quantize_linear(lin, compute_dtype=torch.float32) if nf4 else lin


def _layer(variant: str, nf4: bool, alpha: float = 8.0, dropout: float = 0.0) -> LoRALinear:
    layer = LoRALinear(_base(nf4))
    layer.add_adapter("a", AdapterSpec.from_variant(variant, r=R, alpha=alpha, dropout=dropout), dtype=torch.float32)
    with torch.no_grad():  # make the adapter non-trivial
        layer.lora_B["a"].normal_(std=0.1)
        if variant == "dora":
            layer.lora_magnitude_vector["a"].mul_(torch.rand(OUT) + 0.5)
    return layer


def _dense(layer: LoRALinear, x: torch.Tensor, spec: AdapterSpec) -> torch.Tensor:
    """The variant's formula on dense tensors, with autograd through A, B, m (norm detached)."""
    w = dequantized_weight(layer.base_layer).float()
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    scale = spec.alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)
    w_adapted = w + scale * b @ a
    if spec.use_dora:
        norm = torch.linalg.vector_norm(w_adapted, dim=1).detach()
        w_adapted = (layer.lora_magnitude_vector["a"] / norm)[:, None] * w_adapted
    return x @ w_adapted.t() + layer.base_layer.bias


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_init_is_exactly_the_base(variant, nf4):
    layer = LoRALinear(_base(nf4))
    layer.add_adapter("a", AdapterSpec.from_variant(variant, r=R, alpha=16.0), dtype=torch.float32)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6 if variant == "dora" else 0)
    assert layer.lora_A["a"].abs().sum() > 0 and layer.lora_B["a"].abs().sum() == 0
    # PEFT's Kaiming-uniform(a=sqrt(5)) bound = 1 / sqrt(fan_in)
    assert layer.lora_A["a"].abs().max() <= 1 / math.sqrt(IN) + 1e-7


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_forward_matches_dense_formula(variant, nf4):
    layer = _layer(variant, nf4)
    x = torch.randn(2, 7, IN)
    torch.testing.assert_close(layer(x), _dense(layer, x, layer.specs["a"]), atol=1e-5, rtol=1e-5)
    # the merged dense weight reproduces the same output (NF4: built from the dequantized weight)
    dense = layer.dense_linear("a")
    torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=1e-5)


def test_scales():
    assert AdapterSpec.from_variant("lora", r=16, alpha=32).scale == 2.0
    assert AdapterSpec.from_variant("rslora", r=16, alpha=32).scale == 8.0
    with pytest.raises(ValueError, match="variant"):
        AdapterSpec.from_variant("vera", r=4, alpha=8)


@pytest.mark.parametrize("nf4", [False, True])
def test_dora_gradients_match_autograd_on_dense_formula(nf4):
    layer = _layer("dora", nf4)
    x = torch.randn(3, 5, IN, requires_grad=True)
    g = torch.randn(3, 5, OUT)
    params = [layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"]]
    ours = torch.autograd.grad((layer(x) * g).sum(), [x, *params])
    ref = torch.autograd.grad((_dense(layer, x, layer.specs["a"]) * g).sum(), [x, *params])
    for o, r_ in zip(ours, ref):
        torch.testing.assert_close(o, r_, atol=1e-5, rtol=1e-4)
    assert all(p.abs().sum() > 0 for p in ours)


def test_dora_training_dropout_matches_peft_formula():
    """With dropout: y = base(x) + (g - 1) W x_d + g s B A x_d (PEFT's DoRA training form)."""
    layer = _layer("dora", nf4=False, dropout=0.5).train()
    x = torch.randn(4, IN)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = nn.functional.dropout(x, 0.5, training=True)
    w = layer.base_layer.weight
    a, b, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"]
    s = layer.specs["a"].scale
    g = m / torch.linalg.vector_norm(w + s * b @ a, dim=1)
    ref = layer.base_layer(x) + (g - 1) * (xd @ w.t()) + g * s * (xd @ a.t() @ b.t())
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, layer.eval()(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_training_dropout(backend, nf4):
    """Training mode with dropout p: y = base(x) + s B A (x ⊙ k / (1 - p)). Both backends run the
    Function, which draws k from the seed it draws (:func:`dropout_mask`). Eval mode drops nothing.
    The ``lora_dropout`` module stays (PEFT layout) though only DoRA calls it."""
    from qlora_trainer.kernels.lora_linear import draw_seed, dropout_mask

    layer = _layer("lora", nf4, dropout=0.3).train()
    layer.backend = backend
    assert isinstance(layer.lora_dropout["a"], nn.Dropout) and layer.lora_dropout["a"].p == 0.3
    x = torch.randn(3, 5, IN)
    torch.manual_seed(2)
    y = layer(x)
    torch.manual_seed(2)
    keep = dropout_mask(draw_seed(x.device), (15, IN), 0.3, x.dtype).view(3, 5, IN)
    xd = x * keep / 0.7
    a, b, s = layer.lora_A["a"], layer.lora_B["a"], layer.specs["a"].scale
    ref = layer.base_layer(x) + s * (xd @ a.t() @ b.t())
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, layer.eval()(x))
    torch.testing.assert_close(layer(x), _dense(layer, x, layer.specs["a"]), atol=1e-5, rtol=1e-5)


def test_inject_all_linear_freezes_base(tiny_nf4_model):
    cfg = LoRAConfig(r=4, alpha=8)
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        before = tiny_nf4_model(ids).logits
        names = inject_lora(tiny_nf4_model, cfg, dtype=torch.float32)
        assert torch.equal(tiny_nf4_model(ids).logits, before)  # B = 0: exactly the base model
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert set(lora_layers(tiny_nf4_model)) == set(names)
    trainable = {n for n, p in tiny_nf4_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_train, n_total = trainable_parameters(tiny_nf4_model)
    q = tiny_nf4_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert n_train == sum(p.numel() for n, p in tiny_nf4_model.named_parameters() if p.requires_grad)
    assert n_total > n_train + 4 * 128 * 128  # 4-bit weights counted at their logical size
    assert q.lora_A["default"].shape == (4, 128) and q.lora_B["default"].shape == (128, 4)


def test_inject_patterns_and_errors(tiny_model):
    names = inject_lora(tiny_model, LoRAConfig(r=2, targets=["q_proj", r"model\.layers\.0\.mlp\.down_proj"]),
                        dtype=torch.float32)
    assert sorted(names) == sorted([f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
                                   + ["model.layers.0.mlp.down_proj"])
    with pytest.raises(ConfigError, match="lora.targets.*matches no linear layer"):
        inject_lora(tiny_model, LoRAConfig(targets=["nope_proj"]), dtype=torch.float32, adapter_name="x")
    with pytest.raises(ConfigError, match="lora.init: 'pissa' is not one of kaiming, gaussian"):
        load_config(None, ["lora.init=pissa"])  # PiSSA/OLoRA would need re-quantizing the NF4 base


def test_gaussian_init_and_bf16_dtype(tiny_model):
    inject_lora(tiny_model, LoRAConfig(r=8, init="gaussian", targets=["v_proj"]), dtype=torch.bfloat16)
    a = tiny_model.get_submodule("model.layers.1.self_attn.v_proj").lora_A["default"]
    assert a.dtype == torch.bfloat16
    assert 0.08 < a.float().std().item() < 0.17  # N(0, 1/r) with r = 8


def test_loraplus_param_groups(tiny_model):
    inject_lora(tiny_model, LoRAConfig(r=2, variant="dora", targets=["o_proj"]), dtype=torch.float32)
    groups = {g["name"]: g for g in lora_param_groups(tiny_model, lr=1e-4, loraplus_ratio=16, weight_decay=0.1)}
    assert groups["lora_A"]["lr"] == 1e-4 and groups["lora_B"]["lr"] == pytest.approx(16e-4)
    assert groups["lora_magnitude"]["weight_decay"] == 0.0 and groups["lora_A"]["weight_decay"] == 0.1
    assert all(p.ndim == 2 and p.shape[1] == 2 for p in groups["lora_B"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == 3 * 4


def test_dora_eval_norm_cache_follows_edits():
    layer = _layer("dora", nf4=True).eval()
    x = torch.randn(3, IN)
    with torch.no_grad():
        layer(x)
        layer.lora_B["a"].mul_(2.0)  # in-place edit must invalidate the cached norm
        torch.testing.assert_close(layer(x), _dense(layer, x, layer.specs["a"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_triton_backend_matches_torch(variant):
    """The layer's matmul goes through kernels.lora_matmul: its Triton path (CPU interpreter) gives
    the torch path's output and gradients on an NF4 base."""
    torch_layer = _layer(variant, nf4=True)
    triton_layer = LoRALinear(torch_layer.base_layer, backend="triton")
    triton_layer.add_adapter("a", torch_layer.specs["a"], dtype=torch.float32)
    with torch.no_grad():
        for d in ("lora_A", "lora_B", "lora_magnitude_vector"):
            for k, p in getattr(torch_layer, d).items():
                getattr(triton_layer, d)[k].copy_(p)
    x = torch.randn(2, 3, IN, requires_grad=True)
    grads = []
    for layer in (torch_layer, triton_layer):
        y = layer(x)
        grads.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.lora_A["a"], layer.lora_B["a"]])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dequantized_weight_after_bnb_cpu_repacking():
    """A raw bitsandbytes layer already repacked for its AVX512-BF16 CPU path: the dense W (DoRA,
    merging) undoes the repacking, restores the 4-bit codes exactly and equals our reference on the
    weight as it was (within the bf16 rounding of the scales that the repacking did).

    The repacking is applied with bitsandbytes' own (pure torch) conversion, which its eval/no-grad
    forward calls, so this runs on any CPU; its native repacked GEMM, which needs AVX512-BF16 and
    answers differently elsewhere, is no oracle here."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4_reference

    base = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(nn.Linear(64, 64).state_dict())
    base = base.to("cpu").eval()  # the packing needs 32 | out, in
    before = NF4Weight.from_bnb(base.weight.data.clone(), base.weight.quant_state)
    ref = dequantize_nf4_reference(before, torch.float32)
    w4 = base.weight
    w4.data, w4.quant_state = _convert_weight_packed_for_cpu(w4.data, w4.quant_state)
    base.quant_state = w4.quant_state
    assert getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    w = dequantized_weight(base)
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(base.weight.data.view(torch.uint8).reshape(-1), before.packed)  # codes exact
    torch.testing.assert_close(w, ref, atol=1e-6, rtol=2 ** -7)  # scales: bf16 (8 bits) + re-quantized
    x = torch.randn(3, 64)
    with torch.no_grad():  # the claimed layer computes with our kernels, not the repacked GEMM
        torch.testing.assert_close(base(x), x @ w.t() + base.bias, atol=1e-5, rtol=1e-5)


