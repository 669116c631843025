"""LoRA linear over a frozen (NF4 or dense 16-bit) base weight, with a memory-lean backward.

    y = x @ W^T (+ bias) + s * (x_l @ A^T) @ B^T        x: (M, in), x_l: (M, in) (x after dropout),
                                                        W: (out, in) frozen, A: (r, in), B: (out, r)

Backward, with dy = dL/dy (M, out) and u = x_l @ A^T (M, r) saved from the forward:
    dL/dB  = s * dy^T @ u                     (out, r)
    du     = s * dy @ B                        (M, r)
    dL/dA  = du^T @ x_l                        (r, in)
    dL/dx  = dy @ W   (+ du @ A when x_l is x)  (M, in)
    dL/dx_l = du @ A                           (M, in)    (only when x_l is a separate tensor)
W and bias are frozen: no dW, and W is *recomputed* (dequantized again) in the backward instead of
being saved, so the only saved activations are x_l (M, in) and u (M, r) — x itself is not saved.
The LoRA math runs in the activation dtype; dA/dB are returned in A/B's dtype.

Base matmul: for an NF4 weight with few tokens (M <= ``FUSED_MAX_TOKENS``) a Triton GEMM that
dequantizes inside the operand load (``_triton_lora.py``); otherwise the Triton dequant kernel
(``nf4.py``) to a transient 16-bit W, then cuBLAS. A dense weight goes straight to cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .nf4 import NF4Weight, dequantize_nf4

# Above this many tokens the dequant pass is amortised and cuBLAS on a dequantized W is faster
# than the fused dequant-in-GEMM kernel (to be re-tuned with benchmarks/kernels/bench_nf4_lora.py).
FUSED_MAX_TOKENS = 64


@dataclass(frozen=True, eq=False)  # holds tensors: identity equality
class BaseWeight:
    """The frozen base layer of a LoRA linear: exactly one of ``dense`` (out, in) or ``nf4``; bias
    (out,) or None. ``backend`` (``triton|torch``) picks the NF4 dequant/fused kernels."""

    dense: torch.Tensor | None = None
    nf4: NF4Weight | None = None
    bias: torch.Tensor | None = None
    backend: str = "triton"

    @classmethod
    def from_module(cls, base: nn.Module, backend: str = "triton") -> "BaseWeight | None":
        """From a frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` (NF4); None if unsupported
        (trainable base, FP4, not yet quantized, other module types) — callers then fall back."""
        weight = getattr(base, "weight", None)
        bias = getattr(base, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.requires_grad:
            return None
        if bias is not None and bias.requires_grad:
            return None
        state = getattr(weight, "quant_state", None)
        if state is not None:
            # bnb's CPU inference path may repack the weight (AVX512 layout): not ours to read
            if state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
                return None
            return cls(nf4=NF4Weight.from_bnb(weight.data, state), bias=bias, backend=backend)
        if type(base) is nn.Linear:
            return cls(dense=weight, bias=bias, backend=backend)
        return None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.nf4.shape if self.nf4 is not None else self.dense.shape)  # type: ignore[return-value]

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W (out, in) in ``dtype`` (a transient dequantized copy for NF4)."""
        if self.nf4 is not None:
            return dequantize_nf4(self.nf4, dtype, backend=self.backend)
        return self.dense.to(dtype)

    def _fused(self, m: int, fuse: bool | None) -> bool:
        if self.nf4 is None or self.backend != "triton":
            return False
        return m <= FUSED_MAX_TOKENS if fuse is None else fuse

    def forward_matmul(self, x: torch.Tensor, fuse: bool | None) -> torch.Tensor:
        """x (M, in) -> x @ W^T + bias (M, out), in x.dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._fused(x.shape[0], fuse):
            from ._triton_lora import nf4_matmul

            return nf4_matmul(x, self.nf4, trans_w=True, bias=bias)
        w = self.weight(x.dtype)
        return torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()

    def backward_matmul(self, dy: torch.Tensor, fuse: bool | None) -> torch.Tensor:
        """dy (M, out) -> dy @ W (M, in), in dy.dtype (W recomputed, never saved)."""
        if self._fused(dy.shape[0], fuse):
            from ._triton_lora import nf4_matmul

            return nf4_matmul(dy, self.nf4, trans_w=False)
        return dy @ self.weight(dy.dtype)


class LoRALinearFunction(torch.autograd.Function):
    """forward(x (..., in), x_lora (..., in) | None, A (r, in), B (out, r), base, scale, fuse)
    -> (..., out). ``x_lora=None`` means the adapter reads ``x`` (no dropout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, base: BaseWeight, scale: float, fuse: bool | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1]).to(x.dtype).contiguous()
        a = lora_A.to(x.dtype)
        b = lora_B.to(x.dtype)
        u = xl2 @ a.t()  # (M, r)
        y = base.forward_matmul(x2, fuse)  # (M, out)
        y.addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(xl2, u, lora_A, lora_B)
        ctx.base, ctx.scale, ctx.fuse = base, scale, fuse
        ctx.shared_input = x_lora is None
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xl2, u, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(u.dtype).contiguous()  # (M, out)
        a = lora_A.to(u.dtype)
        b = lora_B.to(u.dtype)
        need_x, need_xl, need_a, need_b = ctx.needs_input_grad[:4]
        du = (dy2 @ b) * s  # (M, r)
        d_a = (du.t() @ xl2).to(lora_A.dtype) if need_a else None  # (r, in)
        d_b = (dy2.t() @ u).mul_(s).to(lora_B.dtype) if need_b else None  # (out, r)
        dx = dxl = None
        if need_x:
            dx = ctx.base.backward_matmul(dy2, ctx.fuse)  # (M, in)
            if ctx.shared_input:
                dx.addmm_(du, a)
            dx = dx.view(*lead, dx.shape[-1])
        if need_xl and not ctx.shared_input:
            dxl = (du @ a).view(*lead, a.shape[-1])
        return dx, dxl, d_a, d_b, None, None, None


def lora_linear(x: torch.Tensor, base: BaseWeight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float, x_lora: torch.Tensor | None = None, *, fuse: bool | None = None) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) + scale * (x_lora @ A^T) @ B^T via :class:`LoRALinearFunction`.

    ``fuse``: force (True) / forbid (False) the fused NF4 dequant-in-GEMM kernel; None = by size."""
    return LoRALinearFunction.apply(x, x_lora, lora_A, lora_B, base, scale, fuse)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                          x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-autograd oracle: weight (out, in) dense (e.g. a dequantized NF4 weight)."""
    xl = x if x_lora is None else x_lora
    y = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y + (xl @ lora_A.to(x.dtype).t() @ lora_B.to(x.dtype).t()) * scale
