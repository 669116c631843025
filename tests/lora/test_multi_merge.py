"""Several adapters on one NF4 base: switching gives exactly each adapter's own logits, disabling
gives the base's, merge/unmerge; ``merge_lora`` equals the adapter forward for every variant.

Tolerances: switching/disabling/unmerging are bit-exact (same ops); merged vs unmerged fp32 logits
atol 1e-4 (one dense matmul instead of base + low-rank: summation order only).
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.config import LoRAConfig
from qlora_trainer.errors import QloraError
from qlora_trainer.lora import (LoRALinear, active_adapter, adapter_names, delete_adapter, disable_adapters,
                                inject_lora, lora_layers, merge_adapter, merge_lora, set_active_adapter,
                                unmerge_adapter)
from qlora_trainer.models.quantize import is_4bit


def _randomize(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.specs:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
                if name in layer.lora_magnitude_vector:
                    layer.lora_magnitude_vector[name].mul_(1 + 0.2 * torch.rand(b.shape[0], generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_switch_disable_merge_unmerge(tiny_nf4_model):
    model, ids = tiny_nf4_model, torch.randint(0, 256, (2, 8))
    base = _logits(model, ids)
    inject_lora(model, LoRAConfig(r=4, alpha=8), dtype=torch.float32, adapter_name="a")
    _randomize(model, "a", 1)
    logits_a = _logits(model, ids)
    inject_lora(model, LoRAConfig(r=2, alpha=4, variant="dora", targets=["q_proj", "v_proj"]),
                dtype=torch.float32, adapter_name="b")
    _randomize(model, "b", 2)
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "b"
    logits_b = _logits(model, ids)
    assert (logits_a - logits_b).abs().max() > 1e-3 and (logits_a - base).abs().max() > 1e-3

    set_active_adapter(model, "a")
    assert torch.equal(_logits(model, ids), logits_a)
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), logits_a)
    set_active_adapter(model, "b")
    assert torch.equal(_logits(model, ids), logits_b)

    merge_adapter(model, "a")
    assert all(layer.merged_layer is not None for layer in lora_layers(model).values())
    torch.testing.assert_close(_logits(model, ids), logits_a, atol=1e-4, rtol=1e-4)
    unmerge_adapter(model)
    assert torch.equal(_logits(model, ids), logits_a)

    with pytest.raises(QloraError, match="no adapter named 'c'"):
        set_active_adapter(model, "c")
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert not any("b" in layer.lora_A for layer in lora_layers(model).values())


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_lora_equals_adapter_forward(tiny_nf4_model, variant):
    model, ids = tiny_nf4_model, torch.randint(0, 256, (2, 8))
    inject_lora(model, LoRAConfig(r=4, alpha=8, variant=variant), dtype=torch.float32)
    _randomize(model, "default", 5)
    q = model.get_submodule("model.layers.2.self_attn.k_proj")
    expected_w = q.merged_weight()
    adapted = _logits(model, ids)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) or is_4bit(m) for m in model.modules())
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 on the CPU
    assert torch.equal(model.get_submodule("model.layers.2.self_attn.k_proj").weight, expected_w)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-4, rtol=1e-4)
