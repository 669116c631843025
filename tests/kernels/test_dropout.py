"""LoRA dropout from a device seed tensor (``kernels/dropout.py``): the Triton kernel vs its torch
reference, determinism given the seed, keep-fraction statistics, the seed drawn on the device.

The reference's Philox bits equal Triton's ``tl.randint`` (checked bit for bit through the kernel's
fp32 output); bf16 outputs agree in the keep pattern and to one bf16 rounding (the CPU interpreter
truncates casts to bf16 instead of rounding).
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.dropout import (draw_seed, dropout_apply, dropout_mask, keep_threshold,
                                           philox_bits)

SEEDS = (0, 12345, 2**62 + 77, 2**63 - 2)


def test_philox_reference_known_values():
    """Philox4x32-10 with key (0, 0), counter (0, 0, 0, 0): first word 0x6627e8d5 (the Random123
    known-answer vector); and key (seed lo, hi) split from the int64 seed."""
    assert philox_bits(torch.tensor([0]), 1).item() == 0x6627E8D5
    bits = philox_bits(torch.tensor([2**40 + 3]), 5)
    assert bits.dtype == torch.int64 and bits.min() >= 0 and bits.max() < 2**32
    assert len(set(bits.tolist())) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_triton_kernel_equals_the_reference(seed, dtype, device):
    """Odd shape (37, 53), p = 0.3, both the new-tensor and the accumulate form."""
    s = torch.tensor([seed], device=device)
    x = torch.randn(37, 53, device=device).to(dtype)
    acc = torch.randn(37, 53, device=device).to(dtype)
    got, want = dropout_apply(x, s, 0.3, "triton"), dropout_apply(x, s, 0.3, "torch")
    got_acc = dropout_apply(x, s, 0.3, "triton", out=acc.clone())
    want_acc = dropout_apply(x, s, 0.3, "torch", out=acc.clone())
    assert got.dtype == want.dtype == dtype and got.shape == (37, 53)
    assert torch.equal(got != 0, want != 0)
    if dtype == torch.float32 or device.type == "cuda":
        assert torch.equal(got, want) and torch.equal(got_acc, want_acc)
    else:  # interpreter: bf16 casts truncate
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
        torch.testing.assert_close(got_acc, want_acc, rtol=2**-7, atol=2**-7)
    keep = dropout_mask(s, (37, 53), 0.3, torch.float32)
    torch.testing.assert_close(got.float(), x.float() * keep / 0.7, rtol=2**-7 if dtype != torch.float32 else 1e-6,
                               atol=0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_mask_is_a_function_of_the_seed_and_keeps_1_minus_p(p):
    for seed in SEEDS:
        s = torch.tensor([seed])
        k = dropout_mask(s, (512, 256), p, torch.bfloat16)
        assert k.dtype == torch.bfloat16 and set(k.unique().tolist()) <= {0.0, 1.0}
        assert abs(k.float().mean().item() - (1 - p)) < 0.01  # 131k draws: sd 0.0014
        assert torch.equal(k, dropout_mask(s.clone(), (512, 256), p, torch.bfloat16))
        assert not torch.equal(k, dropout_mask(s + 1, (512, 256), p, torch.bfloat16))
    # rows are not copies of each other: the offset is the flat index
    k = dropout_mask(torch.tensor([7]), (64, 256), p, torch.float32)
    assert len({tuple(r.tolist()) for r in k}) == 64
    assert keep_threshold(0.0) == 0 and keep_threshold(0.5) == 2**30


def test_seed_is_drawn_on_the_device_by_torch_rng(device):
    torch.manual_seed(3)
    a = draw_seed(device)
    torch.manual_seed(3)
    b, c = draw_seed(device), draw_seed(device)
    assert a.device.type == device.type and a.shape == (1,) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(b, c) and 0 <= a.item() < 2**63 - 1
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        keep_threshold(1.0)
