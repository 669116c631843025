"""Triton RMSNorm (interpreter on CPU) vs the torch reference and a float64 oracle: forward, dx, dw.

Tolerances (‖out − ref‖ / ‖ref‖ against float64 on the same inputs): fp32 1e-5, bf16 1e-2
(bf16 keeps 8 bits of mantissa: one rounding is up to 4e-3 relative; the Triton interpreter
truncates fp32 -> bf16 casts where the GPU rounds to nearest, so bf16 results may differ by an ulp).
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.rmsnorm import RMSNorm, rms_norm, rms_norm_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(shape, dtype, weight_dtype=None, device="cpu"):
    x = (torch.randn(shape) * 2 + 0.5).to(device, dtype).requires_grad_()
    w = (torch.rand(shape[-1]) + 0.5).to(device, weight_dtype or dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 97), (1, 300), (5, 1, 2, 64)])
def test_rmsnorm_forward_and_grads_match_reference(shape, dtype, device):
    x, w = _inputs(shape, dtype, device=device)
    y = rms_norm(x, w, 1e-5, backend="triton")
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, 1e-5)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert y.dtype == dx.dtype == dtype and dw.dtype == dtype
    for got, want in [(y, y64), (dx, dx64), (dw, dw64)]:
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype]
    if dtype == torch.float32:  # and directly against the torch path it replaces
        yr = rms_norm(x, w, 1e-5, backend="torch")
        dxr, dwr = torch.autograd.grad(yr, (x, w), dy)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw, dwr, rtol=1e-5, atol=1e-4)


def test_rmsnorm_bf16_input_fp32_weight_promotes_like_transformers(device):
    x, w = _inputs((4, 33), torch.bfloat16, weight_dtype=torch.float32, device=device)
    y = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == ref.dtype == torch.float32
    # the normalised value is rounded to bf16 before the fp32 weight multiply, on both paths
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    assert not torch.equal(y, y.bfloat16().float())  # the weight multiply happened in fp32


def test_frozen_weight_skips_weight_grad():
    x, w = _inputs((6, 50), torch.float32)
    w.requires_grad_(False)
    y = rms_norm(x, w, 1e-5, backend="triton")
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    (dxr,) = torch.autograd.grad(rms_norm_reference(x, w, 1e-5).sum(), (x,))
    torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-5)
    assert w.grad is None


def test_module_takes_over_weight_and_eps_of_llama_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(40, eps=1e-4)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    ours = RMSNorm.from_module(hf, backend="triton")
    assert ours.weight is hf.weight and ours.variance_epsilon == 1e-4
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    assert list(ours.state_dict()) == ["weight"]


def test_auto_backend_on_cpu_runs_the_reference():
    x, w = _inputs((2, 8), torch.float32)
    y = rms_norm(x, w, 1e-5, backend="auto")
    assert type(y.grad_fn).__name__ != "RMSNormFunctionBackward"
