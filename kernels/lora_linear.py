"""LoRA linear over a frozen (NF4 or dense 16-bit) base weight, with a memory-lean backward.

    y = x @ W^T (+ bias) + s * (x_l @ A^T) @ B^T        x: (M, in), W: (out, in) frozen,
    x_l = x ⊙ k / (1 - p)   (dropout; x_l = x when p = 0)      A: (r, in), B: (out, r)

k (M, in) is the keep-mask, k_ij ~ Bernoulli(1 - p), drawn from a generator seeded with an integer
drawn in the forward (:func:`draw_seed`, from torch's CPU default generator, so checkpoint
recomputes and exact resume redraw the same seed) by :func:`dropout_mask`.

Backward, with dy = dL/dy (M, out) and u = x_l @ A^T (M, r) saved from the forward:
    dL/dB  = s * dy^T @ u                          (out, r)
    du     = s * dy @ B                            (M, r)
    dL/dA  = du^T @ x_l                            (r, in)
    dL/dx  = dy @ W + (du @ A) ⊙ k / (1 - p)       (M, in)   (k = 1 when p = 0)
The dropout branch of dL/dx is the chain rule through x_l = x ⊙ k / (1 - p), whose Jacobian is
diagonal. W and bias are frozen: no dW, and W is *recomputed* (dequantized again) in the backward
instead of being saved; neither x_l nor k is saved either: k is regenerated from the seed (a
transient (M, in) tensor) and x_l = x ⊙ k / (1 - p) rebuilt. The saved activations are x (M, in)
— usually shared with the other adapters reading the same input — and u (M, r), the same bytes
with dropout as without. The LoRA math runs in the activation dtype; dA/dB are returned in A/B's
dtype.

Base matmul: for an NF4 weight with few tokens (M <= ``FUSED_MAX_TOKENS``) a Triton GEMM that
dequantizes inside the operand load (``_triton_lora.py``); otherwise the weight's large-M path
(``BaseWeight.path``, ``model.nf4_matmul``): by default the Triton dequant kernel (``nf4.py``) to a
transient 16-bit W, then cuBLAS. A dense weight goes straight to cuBLAS.
"""

from __future__ import annotations

import torch

from .base_weight import FUSED_MAX_TOKENS, BaseWeight

__all__ = ["FUSED_MAX_TOKENS", "BaseWeight", "LoRALinearFunction", "FrozenLinearFunction", "lora_linear",
           "frozen_linear", "lora_update", "lora_linear_reference", "draw_seed", "dropout_mask"]


def draw_seed() -> int:
    """A dropout seed from torch's CPU default generator (what ``torch.manual_seed`` sets and
    ``torch.utils.checkpoint`` / ``fork_rng`` save and restore, whatever device the tensors are on)."""
    return int(torch.randint(2**62, ()))


def dropout_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask k (``shape``, 1 with probability 1 - p, else 0) in ``dtype`` on ``device``:
    a function of (seed, shape, p, device, dtype) only, so the backward regenerates the forward's."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def _dropped_(mask: torch.Tensor, x2: torch.Tensor, p: float) -> torch.Tensor:
    """x_l = x ⊙ k / (1 - p) (M, in), written over the mask k (one rounding to x's dtype)."""
    return mask.mul_(x2).mul_(1.0 / (1.0 - p))


class LoRALinearFunction(torch.autograd.Function):
    """forward(x (..., in), A (r, in), B (out, r), base, scale, dropout, fuse) -> (..., out).
    ``base`` None: the adapter term s * (x_l A^T) B^T alone (no base matmul, no dy @ W).

    ``dropout`` is the probability p of zeroing an adapter input (applied whenever p > 0: the
    caller passes 0 in eval mode); the mask is never saved (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, base: BaseWeight,
                scale: float, dropout: float, fuse: bool | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        a = lora_A.to(x.dtype)
        b = lora_B.to(x.dtype)
        seed = draw_seed() if dropout > 0 else None
        if seed is None:
            u = x2 @ a.t()  # (M, r)
        else:
            u = _dropped_(dropout_mask(seed, x2.shape, dropout, x2.device, x2.dtype), x2, dropout) @ a.t()
        if base is None:  # adapter term only (see lora_linear(base_last=True))
            y = torch.mm(u, b.t()).mul_(scale)  # (M, out)
        else:
            y = base.forward_matmul(x2, fuse)  # (M, out)
            y.addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x2, u, lora_A, lora_B)
        ctx.base, ctx.scale, ctx.fuse, ctx.p, ctx.seed = base, scale, fuse, dropout, seed
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, u, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(u.dtype).contiguous()  # (M, out)
        a = lora_A.to(u.dtype)
        b = lora_B.to(u.dtype)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        du = (dy2 @ b) * s  # (M, r)
        mask = None
        if ctx.seed is not None and (need_a or need_x):
            mask = dropout_mask(ctx.seed, x2.shape, p, x2.device, x2.dtype)  # (M, in), transient
        d_a = d_b = dx = None
        if need_b:
            d_b = (dy2.t() @ u).mul_(s).to(lora_B.dtype)  # (out, r)
        if need_x:
            if ctx.base is None:
                dx = du @ a if mask is None else (du @ a).mul_(mask).mul_(1.0 / (1.0 - p))
            elif mask is None:
                dx = ctx.base.backward_matmul(dy2, ctx.fuse).addmm_(du, a)  # (M, in)
            else:
                dx = ctx.base.backward_matmul(dy2, ctx.fuse)  # (M, in)
                dx.addcmul_(du @ a, mask, value=1.0 / (1.0 - p))
            dx = dx.view(*lead, dx.shape[-1])
        if need_a:  # last: x_l is built over the mask
            xl2 = x2 if mask is None else _dropped_(mask, x2, p)
            d_a = (du.t() @ xl2).to(lora_A.dtype)  # (r, in)
        return dx, d_a, d_b, None, None, None, None


class FrozenLinearFunction(torch.autograd.Function):
    """forward(x (..., in), base) -> x @ W^T + bias (..., out) for a frozen base weight.

    Backward: dL/dx = dy @ W (M, in), with W recomputed (dequantized again) rather than saved, so
    nothing is saved for backward (W and bias are frozen: no dW, no db)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: BaseWeight, fuse: bool | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = base.forward_matmul(x.reshape(-1, x.shape[-1]).contiguous(), fuse)  # (M, out)
        ctx.base, ctx.fuse = base, fuse
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        lead = dy.shape[:-1]
        dx = ctx.base.backward_matmul(dy.reshape(-1, dy.shape[-1]).contiguous(), ctx.fuse)  # (M, in)
        return dx.view(*lead, dx.shape[-1]), None, None


def frozen_linear(x: torch.Tensor, base: BaseWeight, *, fuse: bool | None = None) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) via :class:`FrozenLinearFunction` (W never saved)."""
    return FrozenLinearFunction.apply(x, base, fuse)


def lora_linear(x: torch.Tensor, base: BaseWeight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float, dropout: float = 0.0, *, fuse: bool | None = None,
                base_last: bool = False) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) + scale * (dropout(x) @ A^T) @ B^T via :class:`LoRALinearFunction`.

    ``dropout``: probability p in [0, 1) of zeroing an adapter input element (0 in eval mode).
    ``fuse``: force (True) / forbid (False) the fused NF4 dequant-in-GEMM kernel; None = by size.
    ``base_last``: for a layer whose output only feeds ops that save nothing (down_proj, before the
    residual add): the adapter term runs first as its own node (it saves x, u, A, B), then the base
    matmul as a :class:`FrozenLinearFunction` (saves nothing), then one add. A non-reentrant
    checkpoint's recompute stops (early stop) once the last saved tensor is packed, i.e. before
    the base matmul and its dequantization, whose output the backward never uses. Same saved
    tensors as the fused form; the sum is rounded once more (``y_base + y_lora`` vs ``addmm_``)."""
    if base_last:
        y_lora = LoRALinearFunction.apply(x, lora_A, lora_B, None, scale, dropout, fuse)
        return frozen_linear(x, base, fuse=fuse) + y_lora
    return LoRALinearFunction.apply(x, lora_A, lora_B, base, scale, dropout, fuse)


def lora_update(x_lora: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
    """Plain-autograd adapter term s * (x_l @ A^T) @ B^T (..., out) in ``dtype``; x_l (..., in),
    A (r, in), B (out, r) (the math in A's dtype). The oracle's and the fallback path's LoRA term."""
    return (x_lora.to(lora_A.dtype) @ lora_A.t() @ lora_B.t()).to(dtype) * scale


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                          x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-autograd oracle: weight (out, in) dense (e.g. a dequantized NF4 weight)."""
    xl = x if x_lora is None else x_lora
    y = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y + lora_update(xl, lora_A.to(x.dtype), lora_B.to(x.dtype), scale, x.dtype)
