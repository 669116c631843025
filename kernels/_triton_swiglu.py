"""Triton gated-activation kernels (SwiGLU ``silu(g) * u``, GeGLU ``gelu_tanh(g) * u``) and their
launchers (imported lazily by ``swiglu.py``; needs triton).

Element-wise over the N * I elements of (N, I) operands whose rows may be strided (the two halves of
a fused (N, 2I) gate/up projection are read in place), BLOCK elements per program (8 bf16 = 16 bytes
per thread at 4 warps x 32 threads x 8). Forward reads gate and up, writes y; backward reads dy,
gate, up and writes d_gate, d_up, recomputing the activation instead of storing it.

Both activations are g * sigmoid(h(g)) (the derivation is in ``swiglu.py``): h(g) = g for silu,
h(g) = 2k (g + a g^3) for tanh-GELU (k = sqrt(2/pi), a = 0.044715), so one kernel body serves both
(``GELU`` constexpr): no tanh, no cancellation near 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_WARPS = 4


@triton.jit
def _act(g, GELU: tl.constexpr):
    """(s, h'(g)) with s = sigmoid(h(g)), the activation being g * s (fp32); for tanh-GELU
    h(g) = 2k (g + a g^3), 2k = 2 sqrt(2 / pi) = 1.5957691216057308, a = 0.044715."""
    if GELU:
        g2 = g * g
        s = tl.sigmoid(1.5957691216057308 * g * (1.0 + 0.044715 * g2))
        dh = 1.5957691216057308 * (1.0 + 0.134145 * g2)  # 3a = 0.134145
    else:
        s = tl.sigmoid(g)
        dh = 1.0
    return s, dh


@triton.jit
def _gated_fwd_kernel(G, U, Y, n, cols, stride_g, stride_u, BLOCK: tl.constexpr, GELU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // cols, offs % cols
    g = tl.load(G + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    s, _ = _act(g, GELU)
    tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(DY, G, U, DG, DU, n, cols, stride_g, stride_u, stride_dg, stride_du,
                      BLOCK: tl.constexpr, GELU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // cols, offs % cols
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    s, dh = _act(g, GELU)
    # d(g * s)/dg = s + g * s * (1 - s) * h'(g)
    tl.store(DG + row * stride_dg + col, (dy * u * (s + g * s * (1.0 - s) * dh)).to(DG.dtype.element_ty),
             mask=mask)
    tl.store(DU + row * stride_du + col, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


def _fwd(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    """g, u: (N, I), unit stride on I (rows may be strided). Returns a contiguous (N, I) y."""
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    n = g.numel()
    if n == 0:
        return y
    _gated_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, y, n, g.shape[1], g.stride(0), u.stride(0),
                                                 BLOCK=_BLOCK, GELU=gelu, num_warps=_WARPS)
    return y


def _bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, gelu: bool,
         out: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """dy: contiguous (N, I); g, u and ``out`` = (d_gate, d_up) (default: new tensors): (N, I) with
    unit stride on I. Returns (d_gate, d_up) in g's dtype."""
    dg, du = out if out is not None else (torch.empty_like(g), torch.empty_like(u))
    n = g.numel()
    if n == 0:
        return dg, du
    _gated_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, g, u, dg, du, n, g.shape[1], g.stride(0), u.stride(0),
                                                 dg.stride(0), du.stride(0), BLOCK=_BLOCK, GELU=gelu,
                                                 num_warps=_WARPS)
    return dg, du


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: (N, I) of one shape and dtype, unit stride on I. Returns silu(g) * u (N, I)."""
    return _fwd(g, u, False)


def swiglu_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (N, I) contiguous; g, u (N, I). Returns (d_gate, d_up) of silu(g) * u (into ``out``)."""
    return _bwd(dy, g, u, False, out)


def geglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: (N, I) of one shape and dtype, unit stride on I. Returns gelu_tanh(g) * u (N, I)."""
    return _fwd(g, u, True)


def geglu_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (N, I) contiguous; g, u (N, I). Returns (d_gate, d_up) of gelu_tanh(g) * u (into ``out``)."""
    return _bwd(dy, g, u, True, out)
