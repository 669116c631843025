"""NF4 / FP4 / Int4 blockwise round trips: error ordering, constant overhead, Int4 exactness."""

from __future__ import annotations

import pytest
import torch

from support.quant_error import error_table, model_linear_weights, quant_error, quantized_copy, roundtrip


def test_nf4_has_lowest_error_on_normal_weights():
    w = torch.randn(64 * 1024) * 0.02
    mse = {k: quant_error(w, k).mse for k in ("nf4", "fp4", "int4")}
    assert mse["nf4"] < 0.85 * mse["fp4"]
    assert mse["nf4"] < 0.85 * mse["int4"]


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4"])
def test_double_quant_cuts_constant_bits_and_barely_changes_error(kind):
    w = torch.randn(64 * 1024)
    single, double = quant_error(w, kind), quant_error(w, kind, double_quant=True)
    assert single.const_bits == pytest.approx(32 / 64)
    # 8-bit constants per 64 weights + one fp32 absmax per 256 constants (+ one fp32 offset)
    assert double.const_bits == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert abs(double.mse - single.mse) < 0.01 * single.mse


def test_int4_is_exact_on_its_own_grid():
    levels = torch.arange(-7, 8, dtype=torch.float32) / 7                        # 15 levels
    w = levels[torch.randint(0, 15, (4 * 64,))].view(4, 64)
    w[:, 0] = 1.0                                                                  # absmax 1 per block
    deq, _ = roundtrip(w, "int4")
    assert deq.shape == w.shape
    torch.testing.assert_close(deq, w, rtol=0, atol=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kind"):
        roundtrip(torch.randn(64), "int8")
    with pytest.raises(ValueError, match="blocksize"):
        roundtrip(torch.randn(100), "nf4")


def test_error_table_and_quantized_copy(tiny_model):
    flat = model_linear_weights(tiny_model)
    assert flat.ndim == 1 and flat.numel() % 4096 == 0
    rows = error_table({"tiny": flat}, kinds=("nf4",))
    assert [(r["kind"], r["double_quant"]) for r in rows] == [("nf4", False), ("nf4", True)]
    q = quantized_copy(tiny_model, "nf4")
    w0 = tiny_model.model.layers[0].self_attn.q_proj.weight
    w1 = q.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w0, w1) and (w0 - w1).abs().max() < 0.2 * w0.abs().max()
    assert torch.equal(q.lm_head.weight, tiny_model.lm_head.weight)               # lm_head stays 16-bit


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_roundtrip_is_the_flat_layout_on_any_cpu(kind):
    """Blocks run over the flattened weight, so a (128, 352) weight (in_features not a multiple of 64,
    where bitsandbytes' AVX512 CPU dequantize mis-indexes the scales) round-trips exactly as its flat
    copy does, with the same error."""
    w = torch.randn(128, 352) * 0.02
    deq, _ = roundtrip(w, kind, double_quant=True)
    flat, _ = roundtrip(w.flatten(), kind, double_quant=True)
    assert torch.equal(deq, flat.view_as(w))
    assert (deq - w).pow(2).mean() < 0.02 * w.pow(2).mean()


def test_quantization_seeds_and_paired_differences(tiny_model):
    from support.quant_error import difference, perplexity_table

    a, b = quantized_copy(tiny_model, "nf4", seed=1), quantized_copy(tiny_model, "nf4", seed=1)
    c = quantized_copy(tiny_model, "nf4", seed=2)
    wa, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, c))
    assert torch.equal(wa, b.model.layers[0].mlp.down_proj.weight) and not torch.equal(wa, wc)
    w0 = tiny_model.model.layers[0].mlp.down_proj.weight
    assert (wa - w0).abs().max() < 0.2 * w0.abs().max()                              # still W, columns restored
    windows = torch.randint(0, 260, (3, 16), generator=torch.Generator().manual_seed(0))
    rows = perplexity_table(tiny_model, windows, seeds=(None, 1))
    by = {r["kind"]: r for r in rows}
    assert by["nf4"]["window_deltas"].shape == (2, 3) and by["nf4"]["delta_se"] > 0
    d, se = difference(rows, "nf4", "int4")
    assert d == pytest.approx(by["nf4"]["delta_loss"] - by["int4"]["delta_loss"], abs=1e-6)
    assert difference(rows, "int4", "nf4") == pytest.approx((-d, se))
