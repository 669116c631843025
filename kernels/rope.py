"""Rotate-half rotary position embedding on q and k: reference, autograd Function, function.

Matches transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)`` for the
token-major layout used here (q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (B or 1, T, D) from the
model's rotary embedding); for head-major q (B, H, T, D) transpose(1, 2) first.

Forward, per head, with x = [x1, x2] (halves of D) and cos = [c1, c2], sin = [s1, s2]:
    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
    y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2
Backward: y = M x is linear in x, so dx = M^T dy:
    dx1 = dy1 * c1 + dy2 * s2,   dx2 = dy2 * c2 - dy1 * s1
which is the forward map with (s1, s2) replaced by (-s2, -s1): one kernel serves both. Nothing is
saved but cos and sin (shared by every layer). cos/sin get no gradient (the rotary embedding
computes them under no_grad).
"""

from __future__ import annotations

import torch

from .backend import resolve_backend


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotate-half RoPE. q: (B, T, Hq, D), k: (B, T, Hk, D), cos/sin: (B|1, T, D)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RoPEFunction(torch.autograd.Function):
    """Triton RoPE. forward(q (B,T,Hq,D), k (B,T,Hk,D), cos, sin (B|1,T,D)) -> (q', k')."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from ._triton_rope import rope_launch

        bsz, t, _, dim = q.shape
        cos, sin = cos.expand(bsz, t, dim), sin.expand(bsz, t, dim)  # batch stride 0 if shared
        if cos.stride(-1) != 1 or cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.meta = [(q.shape, q.dtype, q.device), (k.shape, k.dtype, k.device)]
        return rope_launch(q.contiguous(), k.contiguous(), cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None):
        from ._triton_rope import rope_launch

        cos, sin = ctx.saved_tensors
        # an output that did not reach the loss has no gradient: treat it as zeros
        dq, dk = _grad_or_zeros(dq, ctx.meta[0]), _grad_or_zeros(dk, ctx.meta[1])
        dq, dk = rope_launch(dq.contiguous(), dk.contiguous(), cos, sin, backward=True)
        return dq, dk, None, None


def _grad_or_zeros(g: torch.Tensor | None, meta: tuple) -> torch.Tensor:
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype, device=device) if g is None else g


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) by cos/sin (B|1, T, D); returns new tensors in
    the dtypes of q and k (``backend``: ``auto|triton|torch``)."""
    if resolve_backend(backend, q.device, "rope") != "triton":
        return rope_reference(q, k, cos, sin)
    if q.dtype != k.dtype:
        raise ValueError(f"apply_rope: q and k dtypes differ ({q.dtype} vs {k.dtype})")
    return RoPEFunction.apply(q, k, cos, sin)
