"""Triton SwiGLU (interpreter on CPU) vs the torch reference and a float64 oracle.

Tolerances (‖out − ref‖ / ‖ref‖ against float64 on the same inputs): fp32 1e-5, bf16 1e-2.
Sizes are not multiples of the kernel's 1024-element block.
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.swiglu import SwiGLUMLP, gated_fused, swiglu, swiglu_reference

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


# -- GeGLU (tanh-GELU gate) and the fused gate/up projection --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(3, 7, 97), (2, 1100)])
def test_gated_activations_match_float64(shape, activation, dtype, device):
    """act(g) * u and its gradients, separate gate/up and one fused (..., 2I) gate_up tensor
    (gate its first half), against float64 torch (F.gelu(approximate="tanh") for GeGLU)."""
    g = (torch.randn(shape) * 3).to(device, dtype).requires_grad_()
    u = torch.randn(shape).to(device, dtype).requires_grad_()
    gu = torch.cat([g, u], -1).detach().requires_grad_()
    dy = torch.randn(shape).to(device, dtype)
    y = swiglu(g, u, backend="triton", activation=activation)
    yf = gated_fused(gu, backend="triton", activation=activation)
    assert type(yf.grad_fn).__name__ == "FusedGateUpFunctionBackward" and yf.shape == y.shape
    got = [y, yf, *torch.autograd.grad(y, (g, u), dy), *torch.autograd.grad(yf, gu, dy)]
    g64, u64 = (v.detach().double().requires_grad_() for v in (g, u))
    y64 = swiglu_reference(g64, u64, activation)
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    for got_t, want in zip(got, [y64, y64, dg64, du64, torch.cat([dg64, du64], -1)]):
        assert got_t.dtype == dtype and torch.isfinite(got_t).all()
        assert rel_err(got_t, want) < TOL[dtype]


def test_gelu_tanh_reference_is_transformers_activation():
    from transformers.activations import ACT2FN

    g, u = torch.randn(4, 33) * 4, torch.randn(4, 33)
    assert torch.equal(swiglu_reference(g, u, "gelu_tanh"), ACT2FN["gelu_pytorch_tanh"](g) * u)
    with pytest.raises(ValueError, match="activation must be one of"):
        swiglu(g, u, backend="torch", activation="relu")


def test_fused_gate_up_saves_only_its_input():
    gu = torch.randn(4, 100, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        gated_fused(gu, backend="triton")
    assert saved == [gu.shape]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mlp_module_matches_gemma_and_phi3_mlps(backend):
    """Our module over Gemma 3's (GeGLU) and Phi-3's (fused gate_up, ``up * silu(gate)``) projections:
    the same output, input gradient and weight gradients (fp32), the same state-dict keys."""
    from transformers import Gemma3TextConfig, Phi3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    kw = dict(hidden_size=24, intermediate_size=70, num_attention_heads=4)
    gemma, phi = Gemma3MLP(Gemma3TextConfig(**kw)), Phi3MLP(Phi3Config(**kw))
    ours = [SwiGLUMLP(gemma.gate_proj, gemma.up_proj, gemma.down_proj, backend, activation="gelu_tanh"),
            SwiGLUMLP(None, None, phi.down_proj, backend, gate_up_proj=phi.gate_up_proj)]
    for hf, mine in zip((gemma, phi), ours):
        assert list(mine.state_dict()) == list(hf.state_dict())
        x = torch.randn(2, 5, 24, requires_grad=True)
        params = [x, *hf.parameters()]
        y, yr = mine(x), hf(x)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(yr.square().sum(), params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mlp_module_wants_separate_or_fused_projections():
    lin = torch.nn.Linear(4, 8)
    with pytest.raises(ValueError, match="gate_up_proj alone"):
        SwiGLUMLP(lin, lin, lin, gate_up_proj=lin)
