"""Hazards of bitsandbytes' CPU-feature branches, pinned on any CPU (issue 13; docs/bitsandbytes-cpu.md).

* AVX512-BF16 repacking: forced on through bitsandbytes' own switch, our layers neither repack nor
  change their outputs or input gradients.
* AVX512F dequantize with in_features not a multiple of the block size: our layers compute the
  reference dequantization (an independent oracle of the documented layout), not bitsandbytes'.
* Cached generation through an adapted (kernel-module) model equals uncached generation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from qlora_trainer.kernels.nf4 import NF4Weight
from qlora_trainer.models.quantize import quantize_linear


def _layout_oracle(layer: nn.Module) -> torch.Tensor:
    """W (out, in) from the documented bitsandbytes layout, written out independently (fp32)."""
    w = NF4Weight.from_bnb(layer.weight.data, layer.weight.quant_state)
    q = w.packed.long()
    nib = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[: w.numel]
    absmax = w.absmax
    if w.code2 is not None:
        absmax = w.code2[w.absmax.long()] * w.absmax2.repeat_interleave(w.blocksize2)[: w.absmax.numel()] + w.offset
    return (w.code[nib] * absmax.repeat_interleave(w.blocksize)[: w.numel]).reshape(w.shape)


@pytest.fixture
def avx512bf16_forced(monkeypatch):
    """Every bitsandbytes ``Linear4bit`` created from here on believes the CPU has AVX512-BF16."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


@pytest.mark.parametrize("shape", [(128, 352), (40, 96), (64, 64)])
def test_odd_shapes_compute_the_reference_dequantization(shape):
    """in = 352 or 96 is not a multiple of 64 (bitsandbytes' AVX512F kernel mis-indexes scales)."""
    out_f, in_f = shape
    layer = quantize_linear(nn.Linear(in_f, out_f), compute_dtype=torch.float32).eval()
    x = torch.randn(3, in_f)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, x @ _layout_oracle(layer).t() + layer.bias, atol=1e-5, rtol=1e-5)


def test_forced_repacking_changes_nothing(avx512bf16_forced):
    """With bitsandbytes' AVX512-BF16 switch forced on, an eval/no-grad pass (what repacks a raw
    Linear4bit) neither repacks our layer nor changes its outputs and input gradients afterwards."""
    import bitsandbytes as bnb

    raw = bnb.nn.Linear4bit(352, 128, compute_dtype=torch.float32, quant_type="nf4")
    assert raw.support_avx512bf16_for_cpu  # the fixture works: bitsandbytes would repack
    layer = quantize_linear(nn.Linear(352, 128), compute_dtype=torch.float32)
    assert not layer.support_avx512bf16_for_cpu
    x = torch.randn(2, 5, 352, requires_grad=True)
    y0 = layer.train()(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    with torch.no_grad():
        y_eval = layer.eval()(x.detach())
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    y1 = layer.train()(x)
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    assert torch.equal(y_eval, y0.detach()) and torch.equal(y1, y0) and torch.equal(g1, g0)
    assert g0.abs().sum() > 0


def test_claim_turns_repacking_off_for_hf_stack_layers(avx512bf16_forced):
    """``own_compute=False`` (the HF-stack baseline, PEFT interop) keeps bitsandbytes' compute but
    switches the repacking off, so an eval pass leaves the weight as it was."""
    import bitsandbytes as bnb

    from qlora_trainer.models.nf4_linear import claim_4bit_layers

    raw = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    raw.load_state_dict(nn.Linear(64, 64).state_dict())
    model = nn.Sequential(raw.to("cpu"))
    assert claim_4bit_layers(model, own_compute=False) == 1
    assert type(model[0]) is bnb.nn.Linear4bit and not model[0].support_avx512bf16_for_cpu
    packed = model[0].weight.data.clone()
    with torch.no_grad():
        model.eval()(torch.randn(2, 64))
    assert torch.equal(model[0].weight.data, packed)


def test_nf4_linear_saves_nothing_for_backward():
    """The frozen 4-bit matmul re-dequantizes W in the backward instead of saving it."""
    from qlora_trainer.models.nf4_linear import NF4Linear

    layer = quantize_linear(nn.Linear(96, 40), compute_dtype=torch.float32).train()
    assert type(layer) is NF4Linear
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.ones(4, 40) @ _layout_oracle(layer), atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_uncached_through_adapted_model():
    """Greedy generation with the KV cache equals generation without it, token for token, through
    our attention/MLP/norm modules and LoRA (transformers 5.24 passes the cache as ``cache``)."""
    from qlora_trainer.config import config_from_dict
    from qlora_trainer.models.load import load_base_model
    from qlora_trainer.train.setup import prepare_model

    cfg = config_from_dict({"model": {"name_or_path": "random:tiny"}, "lora": {"r": 4, "alpha": 8},
                            "train": {"device": "cpu"}}).validate()
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    prepare_model(model, cfg, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    ids = torch.randint(0, 256, (1, 7), generator=g)
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=259)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (1, 19)
    assert torch.equal(cached, uncached)


def test_checkpointed_recompute_drops_the_cache_under_any_name():
    from transformers.cache_utils import DynamicCache

    from qlora_trainer.models.checkpointing import without_cache

    c = DynamicCache()
    kw = without_cache({"cache": c, "past_key_values": c, "my_cache": c, "use_cache": True, "x": 1})
    assert kw == {"cache": None, "past_key_values": None, "my_cache": None, "use_cache": False, "x": 1}
