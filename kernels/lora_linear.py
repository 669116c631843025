"""LoRA linear over a frozen (NF4 or dense 16-bit) base weight, with a memory-lean backward.

    y = x @ W^T (+ bias) + s * (x_l @ A^T) @ B^T        x: (M, in), W: (out, in) frozen,
    x_l = x ⊙ k / (1 - p)   (dropout; x_l = x when p = 0)      A: (r, in), B: (out, r)

k (M, in) is the keep-mask, k_ij ~ Bernoulli(1 - p): a counter-based (Philox) function of a (1,)
int64 seed tensor drawn in the forward on x's device (``dropout.draw_seed``, torch's device
generator: checkpoint recomputes and exact resume redraw the same seed, a captured CUDA graph draws
a new one per replay) and of the element offset; ``dropout.SeededDropout`` builds x ⊙ k / (1 - p)
in one pass (Triton kernel, or its bit-exact torch reference: see ``dropout.py``).

Backward, with dy = dL/dy (M, out) and u = x_l @ A^T (M, r) saved from the forward:
    dL/dB  = s * dy^T @ u                          (out, r)
    du     = s * dy @ B                            (M, r)
    dL/dA  = du^T @ x_l                            (r, in)
    dL/dx  = dy @ W + (du @ A) ⊙ k / (1 - p)       (M, in)   (k = 1 when p = 0)
The dropout branch of dL/dx is the chain rule through x_l = x ⊙ k / (1 - p), whose Jacobian is
diagonal. W and bias are frozen: no dW, and W is *recomputed* (dequantized again) in the backward
instead of being saved; neither x_l nor k is saved either: only the seed (8 bytes); the backward
rebuilds x_l = x ⊙ k / (1 - p) and adds (du @ A) ⊙ k / (1 - p) to dy @ W from it (the Triton
kernel never materialises k; the reference holds one bool (M, in) k for the backward's two uses). The saved activations are x (M, in) — usually shared with the other adapters
reading the same input — and u (M, r), the same bytes with dropout as without (+ the seed).
The LoRA math runs in the activation dtype; dA/dB are returned in A/B's dtype.

Base matmul: for an NF4 weight with few tokens (M <= ``DECODE_MAX_TOKENS``) a Triton GEMM that
dequantizes inside the operand load (``_triton_lora.py``); otherwise the weight's large-M path
(``BaseWeight.path``, ``performance.nf4_matmul``): by default the Triton dequant kernel (``nf4.py``) to a
transient 16-bit W, then cuBLAS. A dense weight goes straight to cuBLAS.
"""

from __future__ import annotations

import torch

from .base_weight import DECODE_MAX_TOKENS, BaseWeight
from .dropout import SeededDropout, draw_seed, dropout_mask

__all__ = ["DECODE_MAX_TOKENS", "BaseWeight", "LoRALinearFunction", "FrozenLinearFunction", "lora_linear",
           "frozen_linear", "lora_update", "lora_linear_reference", "draw_seed", "dropout_mask"]


class LoRALinearFunction(torch.autograd.Function):
    """forward(x (..., in), A (r, in), B (out, r), base, scale, dropout, backend, decode) -> (..., out).
    ``base`` None: the adapter term s * (x_l A^T) B^T alone (no base matmul, no dy @ W).

    ``dropout`` is the probability p of zeroing an adapter input (applied whenever p > 0: the
    caller passes 0 in eval mode); the mask is never saved, only its (1,) seed tensor (see the
    module docstring). ``backend`` (``triton|torch``): the dropout kernel or its torch reference."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, base: BaseWeight,
                scale: float, dropout: float, backend: str, decode: bool | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        a = lora_A.to(x.dtype)
        b = lora_B.to(x.dtype)
        seed = draw_seed(x2.device) if dropout > 0 else None  # (1,) int64 on x's device
        if seed is None:
            u = x2 @ a.t()  # (M, r)
        else:
            u = SeededDropout(seed, dropout, backend)(x2) @ a.t()  # x_l (M, in), transient
        if base is None:  # adapter term only (see lora_linear(recompute_skips_base=True))
            y = torch.mm(u, b.t()).mul_(scale)  # (M, out)
        else:
            y = base.forward_matmul(x2, decode)  # (M, out)
            y.addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x2, u, lora_A, lora_B, *(() if seed is None else (seed,)))
        ctx.base, ctx.scale, ctx.decode, ctx.p, ctx.backend = base, scale, decode, dropout, backend
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, u, lora_A, lora_B, *seed = ctx.saved_tensors
        s, p, seed = ctx.scale, ctx.p, (seed[0] if seed else None)
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(u.dtype).contiguous()  # (M, out)
        a = lora_A.to(u.dtype)
        b = lora_B.to(u.dtype)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        du = (dy2 @ b) * s  # (M, r)
        d_a = d_b = dx = None
        drop = None if seed is None else SeededDropout(seed, p, ctx.backend)
        if need_b:
            d_b = (dy2.t() @ u).mul_(s).to(lora_B.dtype)  # (out, r)
        if need_x:
            dx = None if ctx.base is None else ctx.base.backward_matmul(dy2, ctx.decode)  # dy @ W (M, in)
            if seed is not None:  # += (du @ A) ⊙ k / (1 - p), k regenerated from the seed
                dx = drop(du @ a, out=dx)
            elif dx is None:
                dx = du @ a
            else:
                dx.addmm_(du, a)
            dx = dx.view(*lead, dx.shape[-1])
        if need_a:
            xl2 = x2 if drop is None else drop(x2)  # x_l (M, in), transient
            d_a = (du.t() @ xl2).to(lora_A.dtype)  # (r, in)
        return dx, d_a, d_b, None, None, None, None, None


class FrozenLinearFunction(torch.autograd.Function):
    """forward(x (..., in), base) -> x @ W^T + bias (..., out) for a frozen base weight.

    Backward: dL/dx = dy @ W (M, in), with W recomputed (dequantized again) rather than saved, so
    nothing is saved for backward (W and bias are frozen: no dW, no db)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: BaseWeight, decode: bool | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = base.forward_matmul(x.reshape(-1, x.shape[-1]).contiguous(), decode)  # (M, out)
        ctx.base, ctx.decode = base, decode
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        lead = dy.shape[:-1]
        dx = ctx.base.backward_matmul(dy.reshape(-1, dy.shape[-1]).contiguous(), ctx.decode)  # (M, in)
        return dx.view(*lead, dx.shape[-1]), None, None


def frozen_linear(x: torch.Tensor, base: BaseWeight, *, decode: bool | None = None) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) via :class:`FrozenLinearFunction` (W never saved)."""
    return FrozenLinearFunction.apply(x, base, decode)


def lora_linear(x: torch.Tensor, base: BaseWeight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float, dropout: float = 0.0, *, decode: bool | None = None,
                recompute_skips_base: bool = False) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) + scale * (dropout(x) @ A^T) @ B^T via :class:`LoRALinearFunction`.

    ``dropout``: probability p in [0, 1) of zeroing an adapter input element (0 in eval mode).
    ``decode``: force (True) / forbid (False) the split-K NF4 decode kernel (small M); None = by size.
    ``recompute_skips_base``: for a layer whose output only feeds ops that save nothing (down_proj, before the
    residual add): the adapter term runs first as its own node (it saves x, u, A, B), then the base
    matmul as a :class:`FrozenLinearFunction` (saves nothing), then one add. A non-reentrant
    checkpoint's recompute stops (early stop) once the last saved tensor is packed, i.e. before
    the base matmul and its dequantization, whose output the backward never uses. Same saved
    tensors as the fused form; the sum is rounded once more (``y_base + y_lora`` vs ``addmm_``)."""
    if recompute_skips_base:
        y_lora = LoRALinearFunction.apply(x, lora_A, lora_B, None, scale, dropout, base.backend, decode)
        return frozen_linear(x, base, decode=decode) + y_lora
    return LoRALinearFunction.apply(x, lora_A, lora_B, base, scale, dropout, base.backend, decode)


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
