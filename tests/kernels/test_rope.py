"""Triton RoPE (interpreter on CPU) vs transformers' ``apply_rotary_pos_emb`` and a float64 oracle.

Tolerances (‖out − ref‖ / ‖ref‖ against float64 on the same inputs): fp32 1e-6, bf16 1e-2.
cos/sin are random (not cos/sin of angles) so both halves of the general formula are exercised.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from qlora_trainer.kernels.rope import apply_rope, rope_reference

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _hf(q, k, cos, sin):
    """transformers' function in its head-major layout, back to token-major."""
    qh, kh = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qh.transpose(1, 2), kh.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,hq,hk,d,cos_batch", [(2, 5, 3, 1, 10, 1), (1, 7, 4, 2, 16, 1),
                                                   (3, 2, 5, 5, 6, 3)])
def test_rope_forward_and_grads_match_transformers(b, t, hq, hk, d, cos_batch, dtype, device):
    q = torch.randn(b, t, hq, d).to(device, dtype).requires_grad_()
    k = torch.randn(b, t, hk, d).to(device, dtype).requires_grad_()
    cos, sin = torch.randn(cos_batch, t, d).to(device, dtype), torch.randn(cos_batch, t, d).to(device, dtype)
    qo, ko = apply_rope(q, k, cos, sin, backend="triton")
    assert type(qo.grad_fn).__name__ == "RoPEFunctionBackward"
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    q64, k64 = (v.detach().double().requires_grad_() for v in (q, k))
    qr, kr = _hf(q64, k64, cos.double(), sin.double())
    dq64, dk64 = torch.autograd.grad((qr, kr), (q64, k64), (gq.double(), gk.double()))
    for got, want in [(qo, qr), (ko, kr), (dq, dq64), (dk, dk64)]:
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype]


def test_torch_backend_is_exactly_transformers():
    q, k = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)
    cos, sin = LlamaRotaryEmbedding(_config())(q, torch.arange(6)[None])
    for got, want in zip(rope_reference(q, k, cos, sin), _hf(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_real_rotary_tables_and_unused_k_gradient():
    """cos/sin from the model's rotary embedding; only q reaches the loss (k's grad is None)."""
    q = torch.randn(2, 9, 4, 8, requires_grad=True)
    k = torch.randn(2, 9, 2, 8, requires_grad=True)
    cos, sin = LlamaRotaryEmbedding(_config())(q, torch.arange(9)[None] + 3)
    qo, _ = apply_rope(q, k, cos, sin, backend="triton")
    (dq,) = torch.autograd.grad(qo.pow(2).sum(), (q,))
    qr, _ = _hf(q, k, cos, sin)
    (dqr,) = torch.autograd.grad(qr.pow(2).sum(), (q,))
    torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dq, dqr, rtol=1e-5, atol=1e-5)
    # a pure rotation keeps the norm of every (token, head) vector
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
