"""Chunked per-token log-probs vs full-logit ``log_softmax`` in float64: values, d hidden and d weight
under a per-row incoming gradient, ignored rows (0 and no gradient), a partial last chunk and an
all-ignored chunk. fp32 tolerance 1e-5 (relative)."""

from __future__ import annotations

import torch

from qlora_trainer.kernels.token_logprobs import linear_token_logprobs, linear_token_logprobs_reference

N, H, V = 21, 24, 301


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _labels() -> torch.Tensor:
    y = torch.randint(0, V, (N,))
    y[5:10] = -100  # chunk_size=5: one whole chunk ignored
    y[13] = -100
    return y


def test_values_and_grads_match_full_logits():
    torch.manual_seed(0)
    h = (torch.randn(N, H) * 2).requires_grad_()
    w = (torch.randn(V, H) * 0.5).requires_grad_()
    y, g = _labels(), torch.randn(N)
    lp = linear_token_logprobs(h, w, y, chunk_size=5)
    (lp * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_token_logprobs_reference(h64, w64, y)
    (ref * g.double()).sum().backward()
    assert lp.dtype == torch.float32 and lp.shape == (N,)
    assert rel_err(lp, ref) < 1e-5
    assert lp[5:10].abs().max() == 0 and lp[13] == 0
    assert rel_err(h.grad, h64.grad) < 1e-5 and rel_err(w.grad, w64.grad) < 1e-5
    assert h.grad[5:10].abs().max() == 0


def test_frozen_weight_3d_and_no_grad():
    torch.manual_seed(1)
    h = torch.randn(3, 7, H, requires_grad=True)
    w = torch.randn(V, H) * 0.5
    y = _labels().view(3, 7)
    lp = linear_token_logprobs(h, w, y)  # auto chunk
    assert lp.shape == (3, 7)
    lp.sum().backward()
    h64 = h.detach().double().requires_grad_()
    linear_token_logprobs_reference(h64, w.double(), y).sum().backward()
    assert rel_err(h.grad, h64.grad) < 1e-5
    with torch.no_grad():
        again = linear_token_logprobs(h, w, y, chunk_size=4)
    assert not again.requires_grad and rel_err(again, lp.detach()) < 1e-6
