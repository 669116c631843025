"""Triton SwiGLU kernels and launchers (imported lazily by ``swiglu.py``; needs triton).

Element-wise over the flattened (N * I) tensors, BLOCK elements per program (8 bf16 = 16 bytes
per thread at 4 warps x 32 threads x 8). Forward reads gate and up, writes y; backward reads dy,
gate, up and writes d_gate, d_up, recomputing sigmoid(gate) instead of storing silu(gate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    # d silu(g)/dg = s * (1 + g * (1 - s))
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: contiguous, same shape and dtype. Returns silu(g) * u."""
    y = torch.empty_like(g)
    n = g.numel()
    if n == 0:
        return y
    _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, y, n, BLOCK=_BLOCK, num_warps=_WARPS)
    return y


def swiglu_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, g, u: contiguous, same shape. Returns (d_gate, d_up) in g's dtype."""
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n == 0:
        return dg, du
    _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, g, u, dg, du, n, BLOCK=_BLOCK, num_warps=_WARPS)
    return dg, du
