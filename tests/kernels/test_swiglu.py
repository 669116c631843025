"""Triton SwiGLU (interpreter on CPU) vs the torch reference and a float64 oracle.

Tolerances (‖out − ref‖ / ‖ref‖ against float64 on the same inputs): fp32 1e-5, bf16 1e-2.
Sizes are not multiples of the kernel's 1024-element block.
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.swiglu import SwiGLUMLP, swiglu, swiglu_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 97), (1, 1, 1), (2, 1100)])
def test_swiglu_forward_and_grads_match_reference(shape, dtype, device):
    g = (torch.randn(shape) * 3).to(device, dtype).requires_grad_()  # spans silu's curved region
    u = torch.randn(shape).to(device, dtype).requires_grad_()
    y = swiglu(g, u, backend="triton")
    assert type(y.grad_fn).__name__ == "SwiGLUFunctionBackward"
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (g, u), dy)

    g64, u64 = (v.detach().double().requires_grad_() for v in (g, u))
    y64 = swiglu_reference(g64, u64)
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    for got, want in [(y, y64), (dg, dg64), (du, du64)]:
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype]


def test_saves_only_gate_and_up():
    g, u = torch.randn(4, 50, requires_grad=True), torch.randn(4, 50, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        swiglu(g, u, backend="triton")
    assert saved == [g.shape, u.shape]


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4), backend="triton")


def test_mlp_module_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    hf = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=70, num_attention_heads=4))
    ours = SwiGLUMLP(hf.gate_proj, hf.up_proj, hf.down_proj, backend="triton")
    x = torch.randn(2, 5, 24, requires_grad=True)
    y, yr = ours(x), hf(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(yr.sum(), x)[0],
                               rtol=1e-5, atol=1e-6)
    assert set(ours.state_dict()) == set(hf.state_dict())
